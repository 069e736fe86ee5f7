"""The background scavenger (service/scavenger.py) and the heap's bounded step under it
(shm/heap.py PageHeap.scavenge): oldest idle spans first, bounded steps, the retained amount,
released and unreleased neighbours, a kill inside a step, never during a stop of the world --
and, with the real daemon and real workers, memory that comes back by itself."""

import multiprocessing as mp
import os
import signal
import threading
import time

import mpworkers
import pytest
from support import (
    DEADLINE,
    assert_healthy,
    kept_table_ranges,
    kill_and_repair,
    os_pages,
    pattern,
    reserved_by_the_books,
    resident,
    verify_and_free,
)
from test_daemon import finish_workers, observe, run_cli, start_workers

import client
from service.scavenger import Scavenger, parse_retain
from shm import Arena, OutOfMemory, ProcessCache, stats
from shm import layout as L
from shm.errors import StartupError

SPAWN = mp.get_context("spawn")
PAGE = L.PAGE_SIZE
MIB = 1 << 20


def free_spans(arena):
    """{start page: (npages, released)} of the free spans."""
    return {
        r["start"]: (r["npages"], r["released"])
        for r in arena.heap.span_records()
        if r["state"] == L.SPAN_FREE
    }


def page_of(arena, block):
    return arena.lay.handle_page(block.handle)


def heap_word(arena, name):
    return arena.q[arena.lay.heap_word() + L.HEAP[name]]


def idle_pages(arena):
    return (
        heap_word(arena, "committed_pages")
        - heap_word(arena, "inuse_pages")
        - heap_word(arena, "released_pages")
    )


def test_a_span_freed_after_the_cutoff_is_left_alone(arena):
    """The background scavenger passes `freed_before` (now less its minimum idle time): a span
    freed after it -- and every span after it on the idle list, all younger -- stays committed,
    so a producer and a consumer passing blocks of one size keep reusing committed pages."""
    p = ProcessCache(arena)
    a = p.alloc(MIB)
    cutoff = time.monotonic_ns()
    p.free(a)
    p.flush()  # a's span goes back to the heap, freed after the cutoff
    old = {s for s, (_, rel) in free_spans(arena).items() if not rel}
    before = idle_pages(arena)
    pages, _ = arena.scavenge_step(max_pages=1 << 20, max_spans=64, freed_before=cutoff)
    young = arena.lay.handle_page(a.handle)
    assert free_spans(arena)[young] == (MIB // PAGE, 0), "a's span, freed after the cutoff, was released"
    assert pages == before - MIB // PAGE < before, "only the spans freed before the cutoff go"
    pages, _ = arena.scavenge_step(max_pages=1 << 20, max_spans=64)
    assert pages == MIB // PAGE and idle_pages(arena) == 0 and old
    assert arena.check_all() == []
    p.close()


def test_a_release_keeps_the_fine_map_page_a_live_fine_span_shares(arena):
    """A fine span on page 0 and a large block after it, freed and released: the fine-map OS
    pages wholly inside the released pages go back (flags cleared), the one that also describes
    page 0 stays (a release never gives back a byte that describes another page), and the fine
    blocks keep their bytes and generations."""
    from support import unreserved

    p = ProcessCache(arena)
    fine = [p.alloc(64) for _ in range(10)]
    for b in fine:
        b.buf[:] = pattern(b.handle, b.size)
    big = p.alloc(MIB)
    assert page_of(arena, fine[0]) == 0 and page_of(arena, big) == 1
    p.free(big)
    p.flush()  # the large span back to the heap; the fine span's blocks stay allocated
    flags = arena.lay.finemap_flags
    assert arena.mv[flags] == 1
    assert arena.scavenge() >= MIB
    assert arena.mv[flags] == 1, "the fine-map page of page 0 was given back"
    assert bytes(arena.mv[flags + 1 : flags + arena.lay.fine_os_pages]).count(1) == 0
    assert arena.heap.hget("fine_map_pages") == 1
    assert unreserved(arena) == []
    other = ProcessCache(arena)
    for b in fine:
        assert bytes(other.view(b.handle, b.size)) == pattern(b.handle, b.size)
        other.free(b)
    snap = assert_healthy(arena, p, other)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    p.close()
    other.close()


def test_a_span_released_in_pieces_gives_back_the_map_pages_across_their_ends(arena):
    """The scavenger releases a long span a tail at a time (its budget), and each piece joins the
    released ones beside it.  A piece's own release cannot give back the OS page of a map that
    also describes the next piece, still committed; once they are joined it describes released
    pages only, and goes.  Released in 37-page pieces (an OS page of a coarse map describes 64
    pages, one of a fine part 4): what tmpfs holds is exactly the books' -- the fixed regions,
    the slot, the span table's pages and the page map -- and no fine-map page stays reserved."""
    p = ProcessCache(arena)
    blocks = [p.alloc(16) for _ in range(20_000)] + [p.alloc(300_000) for _ in range(8)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    verify_and_free(p, blocks)
    p.flush()
    arena.free_empty_spans()
    steps = 0
    while idle_pages(arena):
        pages, _ = arena.scavenge_step(max_pages=37, max_spans=1)
        assert pages > 0
        steps += 1
    assert steps > 8 and heap_word(arena, "inuse_pages") == 0
    assert heap_word(arena, "released_pages") == heap_word(arena, "committed_pages")
    assert arena.heap.hget("fine_map_pages") == 0
    assert not any(arena.mv[arena.lay.finemap_flags : arena.lay.finemap_flags + arena.lay.fine_os_pages])
    assert os.fstat(arena.fd).st_blocks * 512 == len(reserved_by_the_books(arena)) * L.OS_PAGE
    assert arena.metadata()["coarse"] == 0
    assert assert_healthy(arena, p)["heap_objects"] == 0
    p.close()


def test_a_long_release_clears_fine_map_flags_a_chunk_per_checkpoint(arena, monkeypatch):
    """The flags a release clears are logged a chunk at a time, each chunk a checkpoint (one
    flag per chunk here): the undo log stays bounded however much is released, and the table,
    the count and a reuse agree afterwards."""
    from shm.heap import PageHeap

    monkeypatch.setattr(PageHeap, "FORGET_CHUNK", 1)
    p = ProcessCache(arena)
    blocks = [p.alloc(16) for _ in range(40_000)]  # 80 one-page spans: 20 fine-map pages
    assert arena.heap.hget("fine_map_pages") >= 20
    for b in blocks:
        p.free(b)
    p.flush()
    arena.free_empty_spans()
    pages, _ = arena.scavenge_step(max_pages=1 << 20, max_spans=64)
    assert pages > 0 and arena.heap.hget("fine_map_pages") == 0
    assert not any(arena.mv[arena.lay.finemap_flags : arena.lay.finemap_flags + arena.lay.fine_os_pages])
    again = [p.alloc(16) for _ in range(5000)]
    for b in again:
        b.buf[:] = pattern(b.handle, b.size)
    assert arena.heap.hget("fine_map_pages") > 0
    verify_and_free(p, again)
    assert assert_healthy(arena, p)["heap_objects"] == 0
    p.close()


def test_steps_release_the_spans_idle_longest_first(arena):
    p = ProcessCache(arena)
    a, sep1, c, sep2 = (p.alloc(MIB), p.alloc(64), p.alloc(MIB), p.alloc(MIB))
    pa, pc = page_of(arena, a), page_of(arena, c)
    tail = max(free_spans(arena))  # the rest of the first growth, free since then
    p.free(c)
    p.flush()  # the P's large cache gives c back to the heap now ...
    p.free(a)
    p.flush()  # ... and a after it
    order = []
    while idle_pages(arena):
        before = {s for s, (_, rel) in free_spans(arena).items() if not rel}
        pages, hold = arena.scavenge_step(max_pages=1 << 20, max_spans=1)
        assert pages > 0 and hold > 0
        after = {s for s, (_, rel) in free_spans(arena).items() if not rel}
        assert len(before - after) == 1, "one whole span per step with max_spans=1"
        order += sorted(before - after)
        assert arena.check_all() == []
    assert order == [tail, pc, pa], "the span freed first must go first, the one freed last go last"
    for b in (sep1, sep2):
        p.free(b)
    assert_healthy(arena, p)
    p.close()


def test_a_long_span_goes_in_bounded_steps_down_to_the_kept_pages(arena):
    p = ProcessCache(arena)
    big = p.alloc(8 * MIB)
    p.free(big)
    p.flush()
    idle = idle_pages(arena)
    keep = 100
    steps = 0
    while True:
        pages, _ = arena.scavenge_step(max_pages=64, keep_pages=keep)
        if not pages:
            break
        steps += 1
        assert pages <= 64, "a step releases at most max_pages"
        assert arena.check_all() == []
    assert idle_pages(arena) == keep, "the kept pages stay committed, not one more is released"
    assert steps == -(-(idle - keep) // 64)
    released = [s for s, (_, rel) in free_spans(arena).items() if rel]
    assert len(released) == 1, "the released tails coalesce into one span"
    snap = assert_healthy(arena, p)
    assert snap["heap_released"] == snap["released_bytes"] == (idle - keep) * PAGE
    assert snap["scavenged_bytes"] == 0, "only the background scavenger counts there"
    # The pages come back on use: blocks across the kept and the released parts hold their bytes.
    got = [p.alloc(s) for s in (3 * MIB, 2 * MIB, 40_000, 64)]
    for b in got:
        b.buf[:] = pattern(b.handle, b.size)
    verify_and_free(p, got)
    assert_healthy(arena, p)
    p.close()


def test_released_and_kept_neighbours_merge_when_only_their_union_fits(make_arena):
    """A released span and an unreleased one stay apart; an allocation that fits only in
    both together merges them instead of growing the heap (here it could not grow)."""
    arena = make_arena(heap_max=4 * MIB)
    p = ProcessCache(arena)
    whole = p.alloc(4 * MIB)  # commits the whole heap
    p.free(whole)
    p.flush()
    arena.scavenge_step(max_pages=256, keep_pages=0)  # the tail half released, the head kept
    spans = free_spans(arena)
    assert sorted(rel for _, rel in spans.values()) == [0, 1]
    committed = heap_word(arena, "committed_pages")
    b = p.alloc(3 * MIB)  # more than either part
    b.buf[:] = pattern(b.handle, b.size)
    assert bytes(b.buf) == pattern(b.handle, b.size)
    assert heap_word(arena, "committed_pages") == committed, "merged, not grown"
    with pytest.raises(OutOfMemory):
        p.alloc(2 * MIB)
    p.free(b)
    assert_healthy(arena, p)
    p.close()


def test_the_scavenger_never_steps_while_the_world_is_stopped(arena):
    p = ProcessCache(arena)
    p.free(p.alloc(4 * MIB))
    p.flush()
    s = Scavenger(arena, "0")
    arena.q[L.HDR["stopped_epoch"]] = 7  # what StopTheWorld.begin writes for the pause of epoch 7
    try:
        for i in range(5):
            assert s.tick(time.monotonic() + 60 * i) == 0
        assert heap_word(arena, "released_pages") == 0 and s.steps == 0
    finally:
        arena.q[L.HDR["stopped_epoch"]] = 0
    assert s.tick(time.monotonic() + 600) > 0
    assert heap_word(arena, "scavenged_pages") == heap_word(arena, "released_pages") > 0
    assert arena.q[L.HDR["scavenge_hold_ns"]] > 0
    assert_healthy(arena, p)
    p.close()


def test_retain_is_a_size_or_a_share_of_the_peak(arena):
    assert parse_retain("64M") == ("bytes", 64 * MIB)
    assert parse_retain("0") == ("bytes", 0)
    assert parse_retain("5%") == ("fraction", 0.05)
    for bad in ("lots", "150%", "-1%", "x%"):
        with pytest.raises(StartupError, match="--retain"):
            parse_retain(bad)
    p = ProcessCache(arena)
    p.free(p.alloc(10 * MIB))
    s = Scavenger(arena, "10%")
    heap_sys = heap_word(arena, "committed_pages") * PAGE
    assert s.target() == heap_sys // 10 // PAGE * PAGE
    assert arena.q[L.HDR["retain_target"]] == s.target()
    p.close()


def test_a_bad_retain_refuses_to_start(start_daemon):
    d = start_daemon(extra=("--retain", "150%"), expect_up=False)
    assert d.proc.wait(DEADLINE) == 2
    assert "--retain '150%': a percentage must be between 0% and 100%" in d.log()


def test_sigkill_inside_a_scavenger_step_is_rolled_back(make_arena):
    arena = make_arena(heap_max=64 * MIB, nslots=8)
    main = ProcessCache(arena)
    keep = main.alloc(64)
    main.free(main.alloc(8 * MIB))
    main.flush()
    ready = SPAWN.Event()
    victim = SPAWN.Process(target=mpworkers.stuck_scavenging, args=(arena.name, ready))
    victim.start()
    assert ready.wait(DEADLINE), "victim never reached its step"
    assert arena.q[arena.lay.lock_word(L.LOCK_HEAP)], "the victim should hold the heap lock, dirty"
    b = kill_and_repair(arena, victim, lambda: main.alloc(2 * MIB))  # takes the heap lock
    assert heap_word(arena, "released_pages") == 0, "its half-done release was undone"
    b.buf[:] = pattern(b.handle, b.size)
    assert bytes(b.buf) == pattern(b.handle, b.size)
    main.free(b)
    main.free(keep)
    assert_healthy(arena, main)
    assert arena.scavenge() > 0
    assert_healthy(arena, main)
    main.close()


# --- the real daemon ---------------------------------------------------------------------------
def fill_then_free(d, nworkers, nbytes):
    """Real workers fill `nbytes` each (random sizes 1 B..32 KiB, patterns), then verify and
    free everything and leave.  Returns the resident figures at the peak."""
    filled = [SPAWN.Event() for _ in range(nworkers)]
    go, results = SPAWN.Event(), SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=mpworkers.fill_and_free, args=(d.endpoint, 70 + i, nbytes, filled[i], go, results)
        )
        for i in range(nworkers)
    ]
    for w in procs:
        w.start()
    for e in filled:
        assert e.wait(DEADLINE), "a worker did not fill"
    peak = resident(d.name)
    go.set()
    got = [results.get(timeout=DEADLINE) for _ in procs]
    for w in procs:
        w.join(DEADLINE)
        assert w.exitcode == 0, f"worker exit {w.exitcode}: a pattern did not verify"
    assert sum(t for _, t in got) >= nworkers * nbytes
    return peak


def wait_for(what, cond, seconds, seen=None):
    """`cond()` once it is true; fails after `seconds`, showing `seen` (what cond last saw)."""
    deadline = time.monotonic() + seconds
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} within {seconds} s; last seen: {seen}"
        time.sleep(0.05)


@pytest.mark.slow
def test_memory_comes_back_by_itself_within_10_s(start_daemon):
    # The daemon's defaults: 64 slots (reserved as workers claim them, not at creation) and the
    # default --retain, 5% of the peak.
    d = start_daemon()
    peak = fill_then_free(d, 2, 24 * MIB)
    t0 = time.monotonic()
    now = {}

    def low():
        spy = Arena.attach(d.name)
        try:  # the segment, and what the maps may keep, at one moment
            now.update(
                spy.resident(),
                fine=spy.metadata()["fine"],
                kept=len(os_pages(kept_table_ranges(spy))) * L.OS_PAGE,
            )
        finally:
            spy.close()
        # The maps come back with their pages, in step with the heap: what they keep is the OS
        # pages of their fine parts still reserved for retained spans of fine classes (one
        # describes 32 KiB of heap) and those of their coarse parts that describe a page still
        # committed (the retained 5%) -- not the OS pages across the ends of the pieces the
        # scavenger released one step at a time.  All by the same deadline: a map page goes
        # once every span it describes went, which may be a scavenger step after the heap's
        # total got there.
        return (
            now["total"] <= peak["total"] // 10
            and now["amap"] <= now["kept"] + now["fine"]
            and now["amap"] <= peak["amap"] // 10 + now["fine"]
        )

    wait_for(
        "the segment's resident size, and the maps', down to 10% of its peak (the maps' to what they keep)",
        low,
        10,
        (peak, now),
    )
    took = time.monotonic() - t0
    print(f"peak {peak}, after {took:.2f} s {now}")
    snap = wait_for(
        "the idle heap down to the retained 5%",
        lambda: (
            (s := client.stats(d.endpoint, slow=True))["heap_idle"] - s["heap_released"] == s["retain_target"]
            and s
        ),
        10,
    )
    assert snap["slow_equal"] and stats.identities(snap) == []
    assert snap["heap_objects"] == 0 and snap["scavenged_bytes"] > 0
    assert snap["retain_target"] == snap["heap_sys"] // 20 // PAGE * PAGE
    assert 0 < snap["scavenge_hold_ns"] < 50_000_000
    assert now["heap"] <= peak["heap"] // 10


@pytest.mark.slow
def test_the_retained_amount_stays_committed(start_daemon):
    d = start_daemon(extra=("--retain", "8M"))
    fill_then_free(d, 1, 32 * MIB)

    def settled():
        s = client.stats(d.endpoint)
        return s if s["heap_idle"] - s["heap_released"] == s["retain_target"] else None

    snap = wait_for("the idle heap down to the retained 8 MiB", settled, 10)
    assert snap["retain_target"] == 8 * MIB and snap["heap_released"] > 0
    for _ in range(5):  # steady: the scavenger keeps its target, resident stays above it
        s = client.stats(d.endpoint)
        assert s["heap_idle"] - s["heap_released"] == 8 * MIB
        assert resident(d.name)["heap"] >= 8 * MIB
        assert s["released_bytes"] == snap["released_bytes"], "nothing more released"
    table = run_cli("stats", "--endpoint", d.endpoint).stdout
    for name in ("retain_target", "scavenged_bytes", "released_bytes", "scavenge_hold_ns"):
        assert name in table
    assert "8.0 MiB" in next(line for line in table.splitlines() if "retain_target" in line)


@pytest.mark.slow
def test_sigkill_a_worker_while_the_scavenger_runs(start_daemon):
    d = start_daemon(extra=("--retain", "0"))  # every idle page goes: the scavenger busy throughout
    procs, boxes, results, until = start_workers(d, 3)
    # At work before the kill: spans idle past the scavenger's minimum age (the rest of each
    # growth, say) are going back while the workers run.
    before = wait_for("the scavenger at work", lambda: client.stats(d.endpoint)["scavenged_bytes"], 10)
    victim = procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    seen = observe(d.endpoint, 20)
    assert seen["problems"] == []
    finish_workers(d, procs, boxes, results, until, alive=[p for p in procs if p is not victim])
    r = run_cli("check", "--endpoint", d.endpoint)
    assert r.returncode == 0 and "check: OK" in r.stdout, r.stdout + r.stderr
    assert client.stats(d.endpoint)["scavenged_bytes"] >= before > 0


@pytest.mark.slow
def test_the_daemon_scavenges_nothing_while_its_world_is_stopped(start_daemon):
    """A worker stuck inside the allocator keeps a snapshot's world stopped until the park
    deadline.  Idle pages made meanwhile (a span allocated and freed straight in the page heap)
    stay committed as long as the stop lasts, and go as soon as the world runs again."""
    d = start_daemon(extra=("--retain", "0"))
    arena = Arena.attach(d.name)
    p = ProcessCache(arena)  # a slot of our own: its undo log serves the raw heap operation below
    ready, release, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    stuck = SPAWN.Process(target=mpworkers.stuck_worker, args=(d.endpoint, ready, release, out))
    stuck.start()
    got = []
    try:
        assert ready.wait(DEADLINE)
        t = threading.Thread(target=lambda: got.append(client.stats(d.endpoint, deadline_ms=2000)))
        t.start()
        epoch = wait_for("the world stopped", lambda: arena.q[L.HDR["stopped_epoch"]], 30)

        def grow_and_free(op):
            op.acquire(L.LOCK_HEAP)
            arena.heap.free_span(op, arena.heap.alloc_span(op, 256, 0, 1))

        arena.run(p.slot, grow_and_free)
        scavenged = heap_word(arena, "scavenged_pages")
        assert idle_pages(arena) >= 256, "pages for the scavenger to take"
        while arena.q[L.HDR["stopped_epoch"]] == epoch:
            assert heap_word(arena, "scavenged_pages") == scavenged, "the scavenger ran in a stopped world"
            time.sleep(0.005)
        t.join(DEADLINE)
        assert got and got[0]["consistent"] is False  # the stuck worker missed the deadline
        wait_for("the idle pages released once the world runs", lambda: idle_pages(arena) == 0, 10)
        assert heap_word(arena, "scavenged_pages") >= scavenged + 256
    finally:
        release.set()
        stuck.join(DEADLINE)
        p.close()
        arena.close()
    assert stuck.exitcode == 0
    r = run_cli("check", "--endpoint", d.endpoint)
    assert r.returncode == 0 and "check: OK" in r.stdout, r.stdout + r.stderr


def test_check_names_a_broken_idle_list_or_bucket(arena):
    """PageHeap.check walks the free buckets and the idle list: a back link broken in either is
    named, and the arena checks clean once it is put back."""
    p = ProcessCache(arena)
    blocks = [p.alloc(MIB) for _ in range(3)]
    for b in blocks[::2]:  # two free spans apart, both on the idle list and in bucket 128
        p.free(b)
    p.flush()
    assert arena.check_all() == []
    q, hw = arena.q, arena.lay.heap_word()
    second = q[arena.lay.span_word(q[hw + L.HEAP["idle_head"]] - 1) + L.SPAN["idle_next"]] - 1
    assert second >= 0, "two spans on the idle list"
    for field, what in (("idle_prev", "idle list: span"), ("prev", "free bucket")):
        w = arena.lay.span_word(second) + L.SPAN[field]
        old = q[w]
        q[w] = old + 7
        try:
            assert any(what in x and "prev link" in x for x in arena.check_all()), field
        finally:
            q[w] = old
        assert arena.check_all() == []
    p.free(blocks[1])
    p.close()
