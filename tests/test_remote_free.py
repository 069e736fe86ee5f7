"""Frees of objects another P caches (shm/cache.py's remote-free buffer, Arena._apply_buffer):
buffered in the freer's slot, hinted RFREED at once, applied in batches under one acquisition of
each lock, flushed by every snapshot first; bad frees found late are counted and never applied
twice; a process killed while applying its batch is rolled back and the batch applied once."""

import os

import mpworkers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import (
    DEADLINE,
    assert_healthy,
    kill_and_repair,
    metadata_bytes,
    pattern,
    spawn_victim,
    verify_and_free,
)

from shm import BadHandle, DoubleFree, ProcessCache, cache, identities, layout, read_stats_slow
from shm import stats as shm_stats

SL = layout.SLOT


def buffered(arena, p):
    return [h for h in arena.buffered_frees(p.slot) if h]


def test_a_remote_free_is_buffered_hinted_and_applied_in_one_batch(arena):
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(layout.RFREE_CAP + 10)]
    for b in blocks[: layout.RFREE_CAP]:
        freer.free(b)
    # All in the buffer, each hinted RFREED, nothing applied: the central counters are untouched.
    assert buffered(arena, freer) == [b.handle for b in blocks[: layout.RFREE_CAP]]
    amap = arena.mv
    assert {amap[arena.lay.amap_byte(b.handle)] for b in blocks[: layout.RFREE_CAP]} == {layout.RFREED}
    # The slow walk already counts them free (the calls returned); the snapshot will too.
    assert read_stats_slow(arena)["heap_objects"] == 10
    freer.free(blocks[layout.RFREE_CAP])  # the buffer is full: this free applies it first
    assert buffered(arena, freer) == [blocks[layout.RFREE_CAP].handle]
    states = {amap[arena.lay.amap_byte(b.handle)] for b in blocks[: layout.RFREE_CAP]}
    assert states <= {layout.PENDING, layout.FREE}  # owner's spans: PENDING; uncached ones: FREE
    for b in blocks[layout.RFREE_CAP + 1 :]:
        owner.free(b)
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["frees"] == len(blocks) and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_a_block_of_another_p_is_freed_on_the_fast_path(arena, monkeypatch):
    """A consumer freeing the producer's Block (not its int handle) reads the handle in the fast
    path: _handle, the path of foreign objects, is not taken; the free is buffered and hinted."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(3)]

    def no_handle(block, p):
        raise AssertionError("a Block of this arena went through _handle")

    monkeypatch.setattr(cache, "_handle", no_handle)
    for b in blocks:
        freer.free(b)
    assert buffered(arena, freer) == [b.handle for b in blocks]
    assert {arena.mv[arena.lay.amap_byte(b.handle)] for b in blocks} == {layout.RFREED}
    monkeypatch.undo()
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_a_second_free_of_a_buffered_block_fails_at_once_and_changes_nothing(arena):
    owner, freer, third = ProcessCache(arena), ProcessCache(arena), ProcessCache(arena)
    small, large = owner.alloc(100), owner.alloc(100_000)
    for b in (small, large):
        freer.free(b.handle)
        before = metadata_bytes(arena)
        for p in (owner, freer, third):
            with pytest.raises(DoubleFree):
                p.free(b.handle)
        assert metadata_bytes(arena) == before
    snap = assert_healthy(arena, owner, freer, third)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    for p in (owner, freer, third):
        p.close()


def test_a_lost_hint_still_frees_exactly_once(arena):
    """A retag under the central lock may overwrite the RFREED hint with an allocated state (it
    never hands the object out): the buffered free then applies on that state."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(4)]
    for b in blocks:
        freer.free(b)
    off = arena.lay.amap_byte(blocks[0].handle)
    arena.mv[off] = layout.TAG0 + owner.slot  # what a concurrent collect would write back
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["frees"] == 4 and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_a_free_found_bad_when_applied_is_counted_logged_and_not_applied(arena, caplog):
    """A double free split across processes whose hint was lost: the owner freed the block too,
    so when the buffer is applied the object is free already -- counted, never applied twice."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    victim, other = owner.alloc(64), owner.alloc(64)
    freer.free(victim)
    off = arena.lay.amap_byte(victim.handle)
    arena.mv[off] = layout.TAG0 + owner.slot  # the hint is lost...
    owner.free(victim)  # ...so the owner's own free goes through: LISTED again
    with caplog.at_level("WARNING", logger="shmalloc.arena"):
        freer.flush()
    assert "found bad when applied" in caplog.text
    again = owner.alloc(64)  # the owner's list hands it out once more, to one owner
    assert again.handle == layout.next_handle(victim.handle)
    again.buf[:] = pattern(again.handle, 64)
    owner.free(other)
    snap = assert_healthy(arena, owner, freer)
    assert snap["bad_frees"] == 1 and snap["heap_objects"] == 1
    assert bytes(owner.view(again)[:64]) == pattern(again.handle, 64)
    owner.free(again)
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and identities(snap) == []
    owner.close()
    freer.close()


def test_every_snapshot_flushes_the_buffers_first(arena):
    """The seed's lesson applied to the new cache: a snapshot that read before applying the
    buffered frees would count them live."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(1000) for _ in range(20)]
    owner.flush()  # the owner caches nothing now: only the freer's buffer holds news
    for b in blocks[:15]:
        freer.free(b)
    wrong = shm_stats.read_stats(arena)  # the seed bug, built on purpose: read before flushing
    assert wrong["heap_objects"] == 20
    snap = arena.update_stats(stopped=[owner.slot, freer.slot])
    assert snap["heap_objects"] == 5 and identities(snap) == []
    assert arena.q[arena.lay.slot_word(freer.slot) + SL["rfree_n"]] == 0
    for b in blocks[15:]:
        owner.free(b)
    assert_healthy(arena, owner, freer)
    owner.close()
    freer.close()


def test_closing_applies_the_buffer(arena):
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(30)]
    for b in blocks:
        freer.free(b)
    freer.close()
    snap = assert_healthy(arena, owner)
    assert snap["heap_objects"] == 0 and snap["frees"] == 30
    owner.close()


@pytest.mark.slow
@pytest.mark.parametrize("nth,large", [(1, 0), (2, 0), ("moving", 0), (1, 20), (2, 20)])
def test_sigkill_while_applying_a_batch_rolls_back_and_applies_it_once(make_arena, nth, large):
    """The victim dies inside its batch's operation (central and heap locks held, the `nth`
    span's frees written; with nth 2 the first span's were checkpointed, the buffer's count
    dropped below them; "moving": half way through the step that moves the first span the batch
    emptied from the full list to the partial one).  The next taker of the lock rolls that span
    back; the reclaim applies the rest of the batch, so every free is applied exactly once.
    With `large`, the buffer starts with that many frees of the owner's large blocks, which the
    apply keeps at its start for their owner (RFREE_KEEP): the reclaim applies them too."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    moving = nth == "moving"
    victim, ready, out = spawn_victim(
        mpworkers.stuck_applying_frees, arena.name, 1 if moving else nth, moving, large
    )
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    n_alloc, n_buffered = out.get(timeout=DEADLINE)
    dirty = [lid for lid in range(layout.NLOCKS) if arena.q[arena.lay.lock_word(lid)]]
    assert dirty, "the victim should hold a dirty lock"
    mine = [k for k in arena.registry.active_slots() if arena.registry.pid(k) == victim.pid]
    left = max(arena.q[arena.lay.slot_word(k) + layout.SLOT["rfree_n"]] for k in mine)
    # The first span's frees checkpointed: the count no longer holds them (nth 1: nothing yet).
    assert (left == n_buffered) if nth in (1, "moving") else (0 < left < n_buffered)
    other = ProcessCache(arena)
    b = kill_and_repair(arena, victim, lambda: other.alloc(64))  # takes central[64 B]
    other.free(b)
    snap = assert_healthy(arena, main, other)  # reclaims the victim: its batch applied now, once
    assert snap["heap_objects"] == n_alloc - n_buffered and snap["bad_frees"] == 0
    assert snap["frees"] == n_buffered + 1
    other.close()
    main.close()


@settings(max_examples=300, deadline=None)
@given(
    n=st.sampled_from([1, 8, 13, 128, 512]),
    data=st.data(),
)
def test_a_group_of_buffered_frees_is_judged_as_one_handle_at_a_time_would(n, data):
    """central.freed checks a dense group in bulk: its result -- object bytes, generations,
    frees applied -- is the one of judging each handle in turn, whatever the group holds: a
    stale generation, a handle between two objects or past the last, one named twice, an object
    no longer RFREED, a generation about to wrap."""
    from shm.central import _BAD, _UNCACHED_T, freed, handle_steps

    j0, stride = 4096, 8
    states = st.sampled_from([layout.RFREED] * 4 + [layout.FREE, layout.ALLOC, layout.LISTED])
    old = bytes(data.draw(st.lists(states, min_size=n, max_size=n)))
    if data.draw(st.booleans()):  # every object freed by one P (but maybe one): the whole span named
        old = bytes([layout.RFREED]) * n
        if data.draw(st.booleans()):
            old = old[:-1] + bytes([data.draw(states)])
    gens = bytes(data.draw(st.lists(st.sampled_from([0, 1, 254, 255]), min_size=n, max_size=n)))
    base, step = handle_steps(j0, stride)
    every = [base + i * step + gens[i] for i in range(n)]
    good = [h for h, b in zip(every, old) if b == layout.RFREED]
    odd = st.one_of(
        st.sampled_from(good or [base]).map(lambda h: h ^ 1),  # another generation
        st.integers(0, n).map(lambda i: base + i * step + step // 2),  # between objects, or past
        st.sampled_from(good or [base]),  # named twice
        st.sampled_from(every),  # an object at its generation, in whatever state it is
    )
    extra = data.draw(st.lists(odd, max_size=3))
    handles = sorted(good + extra) if data.draw(st.booleans()) else sorted(good)
    if data.draw(st.booleans()):
        handles = every  # the whole span named, whatever its objects' states
    new, new_gens, changed = freed(old, gens, j0, stride, handles, _UNCACHED_T)
    want, want_gens, done = bytearray(old), bytearray(gens), []
    for h in handles:
        i, gen = divmod(h - base, step)
        if 0 <= i < n and want_gens[i] == gen and _UNCACHED_T[want[i]] != _BAD:
            want[i] = _UNCACHED_T[want[i]]
            want_gens[i] = (gen + 1) & layout.GEN_MASK
            done.append(i)
    assert bytes(new) == bytes(want) and bytes(new_gens) == bytes(want_gens)
    assert (len(handles) if changed is None else len(changed)) == len(done)


def _heap_state(arena):
    """Every span record (but its freed_ns, a clock reading) and every byte from the page map to
    the heap: the object and generation bytes included."""
    lay, q = arena.lay, arena.q
    high = q[lay.heap_word() + layout.HEAP["records_high"]]
    cut = layout.SPAN["freed_ns"]
    spans = [q[lay.span_word(r) : lay.span_word(r) + cut].tolist() for r in range(high)]
    return spans, os.pread(arena.fd, lay.heap_off - lay.pagemap_off, lay.pagemap_off)


def _fold_scenario(arena):
    """An owner caching a 64 B span, two freers freeing parts of it (their frees buffered in the
    owner's span), one of them a double free whose hint was lost and which the owner freed too."""
    owner, a, b = ProcessCache(arena), ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(100)]
    for i, blk in enumerate(blocks[:70]):
        (a if i % 3 else b).free(blk)
    victim = owner.alloc(64)
    a.free(victim)
    arena.mv[arena.lay.amap_byte(victim.handle)] = layout.TAG0 + owner.slot  # the hint is lost...
    owner.free(victim)  # ...so the owner's own free goes through: LISTED
    return owner, a, b


def test_a_flush_applies_the_frees_buffered_in_a_span_it_uncaches_with_that_uncache(
    make_arena, caplog, monkeypatch
):
    """Flushed together, the owner's span is uncached and both freers' frees in it applied in the
    same step (apply_frees is not called); the result is the one of applying the buffers first:
    the same object and generation bytes, span records and figures; the bad free counted once,
    logged, and not applied."""
    from shm.central import CentralList

    calls, real = [], CentralList.apply_frees

    def apply_frees(self, *args):
        calls.append(args)
        return real(self, *args)

    monkeypatch.setattr(CentralList, "apply_frees", apply_frees)
    folded, first = make_arena(), make_arena()
    out = {}
    for arena in (folded, first):
        owner, a, b = _fold_scenario(arena)
        calls.clear()
        if arena is first:
            arena.apply_buffered_frees(a.slot)
            arena.apply_buffered_frees(b.slot)
            assert len(calls) == 2
        with caplog.at_level("WARNING", logger="shmalloc.arena"):
            arena.flush_slots([owner.slot, a.slot, b.slot], keep_empty=True)
        if arena is folded:
            assert calls == [], "the frees were applied by the uncache, not by apply_frees"
        assert "found bad when applied" in caplog.text
        caplog.clear()
        out[arena] = (_heap_state(arena), read_stats_slow(arena))
        snap = assert_healthy(arena, owner, a, b)
        assert snap["bad_frees"] == 1 and snap["heap_objects"] == 30
        for p in (owner, a, b):
            p.close()
    assert out[folded][0] == out[first][0]
    assert shm_stats.diff(out[folded][1], out[first][1]) == []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["generations", "step"])
def test_sigkill_inside_an_uncache_that_applies_buffered_frees_rolls_back(make_arena, where):
    """The flusher dies inside the step that uncaches a span and applies the frees another P
    buffered in it (its generations written, or the whole step before its checkpoint).  The next
    taker of the lock rolls the step back -- generations, object bytes, the buffer's count as
    before -- and the reclaim applies every buffered free once."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    victim, ready, out = spawn_victim(mpworkers.stuck_folding_frees, arena.name, where)
    handles, freer = out.get(timeout=DEADLINE)
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    gens = [arena.mv[arena.lay.gmap_byte(h)] for h in handles]
    assert gens == [(h + 1) & layout.GEN_MASK for h in handles]  # half done: generations moved on
    rfree_n = arena.lay.slot_word(freer) + SL["rfree_n"]
    assert arena.q[rfree_n] == (len(handles) if where == "generations" else 0)
    b = kill_and_repair(arena, victim, lambda: main.alloc(64))  # takes central[64 B]
    assert [arena.mv[arena.lay.gmap_byte(h)] for h in handles] == [h & layout.GEN_MASK for h in handles]
    assert {arena.mv[arena.lay.amap_byte(h)] for h in handles} == {layout.RFREED}
    assert arena.q[rfree_n] == len(handles)
    main.free(b)
    snap = assert_healthy(arena, main)  # reclaims the victim's Ps: the buffer applied now, once
    assert snap["heap_objects"] == 100 - len(handles) and snap["bad_frees"] == 0
    assert snap["frees"] == len(handles) + 1
    main.close()


def test_many_large_blocks_freed_by_another_process_go_back_in_bounded_steps(make_arena):
    """More PENDING large spans than one undo log could roll back.  The owner's next large slow
    path takes a cache's worth back, leaves one remote-free buffer's worth waiting for its next
    allocations, and gives the oldest others back to the heap, a checkpoint after each; a
    snapshot's flush leaves the waiting ones alone; closing gives them back."""
    arena = make_arena(heap_max=1 << 30, nslots=4)
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    n = 2 * layout.RFREE_CAP
    blocks = [owner.alloc(300_000) for _ in range(n)]
    for b in blocks:
        freer.free(b)
    freer.flush()  # applied: every span PENDING for its owner
    sw = arena.lay.slot_word(owner.slot)
    assert arena.q[sw + SL["lg_pending"]] == n
    order = [arena.large.base(r) for r in arena.large.pending(owner.slot)]  # newest first
    b = owner.alloc(2 << 20)  # a large slow path: collects them
    kept = sum(len(v) for v in owner._lcache.values())
    assert kept == cache.LARGE_CACHE_SPANS
    assert arena.q[sw + SL["lg_pending"]] == cache.LARGE_PENDING_SPANS
    waiting = {arena.large.base(r) for r in arena.large.pending(owner.slot)}
    assert waiting == set(order[kept : kept + cache.LARGE_PENDING_SPANS]), "the oldest went back"
    # A snapshot's flush (the daemon's: live blocks stay owned) leaves the waiting spans.
    arena.flush_slots([owner.slot, freer.slot], keep_empty=True, disown=False)
    assert arena.q[sw + SL["lg_pending"]] == cache.LARGE_PENDING_SPANS
    snap = arena.read_stats()
    assert identities(snap) == [] and arena.check_all() == []
    assert shm_stats.diff(snap, read_stats_slow(arena)) == []
    assert snap["large_frees"] == n and snap["bad_frees"] == 0
    again = owner.alloc(300_000)  # the newest waiting span, taken back into the cache
    assert again.handle in waiting
    owner.free(again)
    owner.free(b)
    owner.close()  # gives back every span it still had
    assert arena.q[sw + SL["lg_pending"]] == 0 and arena.q[sw + SL["lg_pend_head"]] == 0
    snap = assert_healthy(arena, freer)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == n + 2
    freer.close()


def test_spans_a_batch_empties_wait_for_the_next_refill_up_to_a_bound(arena):
    """A consumer's batch of remote frees empties the producer's spans: EMPTY_KEEP_C[c] of them
    wait on the partial list (counted in nempty) and the producer's next refills take them without
    the page heap; the others go back to the heap at once.  For 4 KiB blocks, 64 a span, that is
    the 4 spans a whole batch empties (1 MiB)."""
    from shm.central import EMPTY_KEEP_C
    from shm.sizeclasses import CLASS_TO_NOBJS, SIZE_TO_CLASS

    producer, consumer = ProcessCache(arena), ProcessCache(arena)
    c = SIZE_TO_CLASS[4096 >> 3]
    keep = EMPTY_KEEP_C[c]
    assert keep == layout.RFREE_CAP // CLASS_TO_NOBJS[c] == 4
    nspans = keep + 3
    blocks = [producer.alloc(4096) for _ in range(nspans * CLASS_TO_NOBJS[c])]
    producer.flush()  # every span uncached, full
    cw = arena.lay.central_word(c)
    spans = arena.q[cw + layout.CENTRAL["nspans"]]
    for b in blocks:
        consumer.free(b.handle)
    consumer.flush()  # the batch applied: every span emptied
    assert arena.q[cw + layout.CENTRAL["nempty"]] == keep
    assert arena.q[cw + layout.CENTRAL["nspans"]] == spans - (nspans - keep)
    assert arena.check_all() == []
    arena.q[cw + layout.CENTRAL["nempty"]] += 1  # the check holds the count to the spans
    assert any("nempty" in x for x in arena.check_all(["central"]))
    arena.q[cw + layout.CENTRAL["nempty"]] -= 1
    grows = arena.heap.hget("grows")
    again = [producer.alloc(4096) for _ in range(keep * CLASS_TO_NOBJS[c])]
    assert arena.heap.hget("grows") == grows and arena.q[cw + layout.CENTRAL["nempty"]] == 0
    for b in again:
        b.buf[:] = pattern(b.handle, b.size)
    verify_and_free(producer, again)
    snap = assert_healthy(arena, producer, consumer)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    producer.close()
    consumer.close()


def large_batch(p, size):
    """How many frees of other Ps' large blocks of `size` bytes P p buffers before it applies
    its buffer: the one that brings their pages to its bound (LARGE_RFREE_BYTES, a quarter of
    the heap at most) applies it."""
    npg = -(-size // layout.PAGE_SIZE)
    return -(-p._rlcap // npg)


def test_frees_of_another_ps_large_blocks_wait_until_their_pages_reach_a_bound(arena):
    """A P buffers frees of other Ps' large blocks until their pages reach LARGE_RFREE_BYTES (a
    quarter of the heap at most), then applies its buffer: an owner that does not take them
    back gets its pages back then, not once 256 frees have waited (a gigabyte of 4 MiB
    blocks).  Small blocks freed alongside wait as before."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    batch = large_batch(freer, 100_000)
    assert 8 < batch < layout.RFREE_CAP // 2  # the bound is the pages', not the buffer's
    n = 2 * batch + 3
    large = [owner.alloc(100_000) for _ in range(n)]
    small = [owner.alloc(4096) for _ in range(40)]  # every other one starts a page: not large
    sw, ow = arena.lay.slot_word(freer.slot), arena.lay.slot_word(owner.slot)
    for b in small:
        freer.free(b.handle)
    assert arena.q[sw + SL["rfree_n"]] == len(small)
    for j, b in enumerate(large, 1):
        freer.free(b.handle)
        applied = j // batch * batch
        assert arena.q[ow + SL["lg_pending"]] == applied, j
    assert arena.q[sw + SL["rfree_n"]] == n - applied  # the small ones went with the first batch
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    assert snap["large_taken_back"] == 0 and snap["large_pending_frees"] == n  # the owner never looked
    owner.close()
    freer.close()


def test_buffered_frees_are_grouped_a_span_at_a_time_as_a_page_at_a_time_would(arena):
    """_buffer_groups takes a small span's handles at once when every page of it names it in
    the page map, a page at a time otherwise: the groups are the ones a lookup of each handle's
    span gives, the page map's word changed or not; every large block's in one group
    (LARGE_GROUP, each looked up again under the heap lock when applied)."""
    import random

    from shm.arena import LARGE_GROUP

    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(4096) for _ in range(140)]  # 32-page spans of 64
    blocks += [owner.alloc(size) for size in (100, 3000, 100_000, 40_000, 100_000)]
    order = blocks[:]
    random.Random(7).shuffle(order)
    for b in order:
        freer.free(b.handle)
    lay, heap = arena.lay, arena.heap

    def by_lookup():
        want = {}
        for b in blocks:
            r = heap.span_of_page(lay.handle_page(b.handle))
            key = (arena.q[lay.span_word(r) + layout.SPAN["sizeclass"]], r)
            want.setdefault(key if key[0] else LARGE_GROUP, []).append(b.handle)
        return {key: sorted(hs) for key, hs in want.items()}

    want = by_lookup()
    assert sum(len(hs) > 30 for hs in want.values()) == 2  # two whole 4 KiB spans
    assert len(want[LARGE_GROUP]) == 3
    assert arena._buffer_groups(freer.slot) == want
    # A page-map word inside a 4 KiB span that names no span: its pages go one at a time, each
    # grouped by its own word (the broken page alone under no span), the others still with theirs.
    (c, r), hs = max(want.items(), key=lambda kv: len(kv[1]))
    w = lay.span_word(r)
    start, npages = arena.q[w + layout.SPAN["start"]], arena.q[w + layout.SPAN["npages"]]
    pm = lay.pagemap_word() + start + npages // 2
    arena.q[pm] = 0
    got = arena._buffer_groups(freer.slot)
    arena.q[pm] = r + 1
    lost = [h for h in hs if lay.handle_page(h) == start + npages // 2]
    assert lost and got[-1, -1] == lost
    assert sorted(got[c, r] + lost) == hs
    assert {k: v for k, v in got.items() if k not in ((c, r), (-1, -1))} == {
        k: v for k, v in want.items() if k != (c, r)
    }
    for b in blocks:
        assert arena.mv[lay.amap_byte(b.handle)] == layout.RFREED
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_frees_of_another_ps_large_blocks_take_the_fast_path_but_every_batchth(arena, monkeypatch):
    """The fast path buffers a free of another P's large block and counts it with its pages:
    the free that brings them to the bound takes the slow path, which applies the buffer; a
    flush that applied the buffer meanwhile starts the count afresh."""
    slow = []
    real = ProcessCache._slow_free

    def counted(self, h):
        slow.append(h)
        return real(self, h)

    monkeypatch.setattr(ProcessCache, "_slow_free", counted)  # bound by the caches made next
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    batch = large_batch(freer, 100_000)
    blocks = [owner.alloc(100_000) for _ in range(3 + 2 * batch)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    sw, ow = arena.lay.slot_word(freer.slot), arena.lay.slot_word(owner.slot)
    for b in blocks[:3]:
        freer.free(b)
    assert slow == [] and buffered(arena, freer) == [b.handle for b in blocks[:3]]
    freer.flush()  # applied: PENDING for the owner
    assert arena.q[ow + SL["lg_pending"]] == 3 and arena.q[sw + SL["rfree_n"]] == 0
    rest = blocks[3:]
    for j, b in enumerate(rest, 1):
        assert bytes(freer.view(b.handle, b.size)) == pattern(b.handle, b.size)
        freer.free(b)
        assert len(slow) == j // batch, j  # the count started afresh after the flush
        assert arena.q[ow + SL["lg_pending"]] == 3 + j // batch * batch
        assert arena.q[sw + SL["rfree_n"]] == j % batch
    assert slow == [rest[batch - 1].handle, rest[-1].handle]
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == len(blocks) and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_an_owner_takes_its_large_blocks_back_out_of_the_buffer_of_the_p_that_freed_them(arena):
    """Frees of another P's large blocks wait in the freer's buffer (RFREED), and tell their
    owner (lg_rhint).  The owner's next large allocation that its cache cannot serve takes them
    back out of that buffer (their entries 0), as its own frees would have put them in its
    cache: no heap lock taken by the freer, no pending list, the old handles stale."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(100_000) for _ in range(4)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    hs = [b.handle for b in blocks[:3]]
    hint = arena.lay.slot_word(owner.slot) + SL["lg_rhint"]
    assert arena.q[hint] == 0
    for h in hs:
        assert bytes(freer.view(h, 100_000)) == pattern(h, 100_000)
        freer.free(h)
    assert buffered(arena, freer) == hs and arena.q[hint] == 1
    c = owner.alloc(100_000)  # its large cache is empty: it looks in the other buffers
    assert arena.q[hint] == 0 and arena.buffered_frees(freer.slot) == [0, 0, 0]
    assert c.handle == layout.next_handle(hs[2])  # the last taken, on top of its cache
    cached = sorted(h for lst in owner._lcache.values() for h in lst)
    assert cached == sorted(layout.next_handle(h) for h in hs[:2])
    assert [arena.mv[arena.lay.amap_byte(h)] for h in hs] == [layout.LISTED, layout.LISTED, owner._tag]
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 0
    for h in hs:
        with pytest.raises(BadHandle):  # stale: each was taken back, one handed out again
            freer.free(h)
    freer.flush()  # nothing left to apply: the buffer is emptied, nothing counted bad
    assert arena.buffered_frees(freer.slot) == []
    c.buf[:] = pattern(c.handle, c.size)
    snap = assert_healthy(arena, owner, freer)
    assert snap["large_mallocs"] == 5 and snap["large_frees"] == 3 and snap["bad_frees"] == 0
    assert snap["large_taken_back"] == 3 and snap["large_pending_frees"] == 0
    verify_and_free(owner, [blocks[3], c])
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0
    owner.close()
    freer.close()


def hand_back_rounds(owner, freer, size, n):
    """n rounds of: `owner` allocates `size` bytes (taking back the block `freer` freed last: the
    same block each time) and fills it with its pattern, `freer` checks it and frees it.
    Returns the handles, in order."""
    handles = []
    for _ in range(n):
        b = owner.alloc(size)
        b.buf[:] = pattern(b.handle, b.size)
        handles.append(b.handle)
        assert bytes(freer.view(b.handle, b.size)) == pattern(b.handle, b.size)
        freer.free(b.handle)
    return handles


def test_a_buffer_whose_every_entry_was_taken_back_is_emptied_when_full(make_arena):
    """A freer's buffer whose large frees their owner all took back holds only zeros: when it is
    full, the next free empties it (nothing to apply) and is buffered as the first."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    n = layout.RFREE_CAP + 3
    assert large_batch(freer, 33_000) > n  # the pages' bound never applies the buffer here
    handles = hand_back_rounds(owner, freer, 33_000, n)
    assert len({h >> layout.GEN_BITS for h in handles}) == 1
    assert all(layout.next_handle(a) == b for a, b in zip(handles, handles[1:]))  # a generation more
    left = arena.buffered_frees(freer.slot)
    assert left == [0, 0, handles[-1]]  # emptied at the 257th free, its first entry since
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 0
    snap = assert_healthy(arena, owner, freer)
    assert snap["large_mallocs"] == n and snap["large_frees"] == n and snap["heap_objects"] == 0
    assert snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_an_apply_skips_the_frees_their_owner_took_back_after_it_read_its_buffer(arena, monkeypatch):
    """A P reads its buffer without a lock, then takes the locks to apply it: frees of large
    blocks whose owner took them back in between (their entries 0 now) are not applied again
    -- nothing counted bad, the blocks the owner's."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(100_000) for _ in range(3)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    hs = [b.handle for b in blocks]
    for h in hs:
        assert bytes(freer.view(h, 100_000)) == pattern(h, 100_000)
        freer.free(h)
    real, taken = arena._buffer_groups, []

    def read_then_taken(k):
        groups = real(k)
        if k == freer.slot and not taken:
            taken.append(owner.alloc(100_000))  # between the read and the locks
        return groups

    monkeypatch.setattr(arena, "_buffer_groups", read_then_taken)
    freer.flush()
    assert taken and taken[0].handle == layout.next_handle(hs[2])
    assert arena.buffered_frees(freer.slot) == []
    snap = assert_healthy(arena, owner, freer)
    assert snap["bad_frees"] == 0 and snap["large_frees"] == 3 and snap["heap_objects"] == 1
    owner.free(taken[0])
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0
    owner.close()
    freer.close()


def test_frees_their_owner_took_back_do_not_count_toward_the_bound(arena):
    """The pages' bound is on the frees still waiting in a buffer: the free that reaches it finds
    the others taken back by their owner (entries 0), and the buffer is not applied -- it grows
    while the owner keeps taking its blocks back, none of them sent to its pending list."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    n = 2 * large_batch(freer, 100_000) + 5  # past the bound twice
    assert n < layout.RFREE_CAP
    handles = hand_back_rounds(owner, freer, 100_000, n)
    sw, ow = arena.lay.slot_word(freer.slot), arena.lay.slot_word(owner.slot)
    assert arena.q[sw + SL["rfree_n"]] == n  # never applied
    assert buffered(arena, freer) == [handles[-1]]  # the others taken back
    assert arena.q[ow + SL["lg_pending"]] == 0
    snap = assert_healthy(arena, owner, freer)
    assert snap["large_frees"] == n and snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    assert snap["large_taken_back"] == n - 1 and snap["large_pending_frees"] == 1  # the last, at the flush
    owner.close()
    freer.close()


def test_an_owner_finds_its_blocks_in_a_buffer_applied_and_refilled_since_it_last_looked(arena):
    """An owner reads each other P's buffer from where it last stopped; a buffer applied since and
    refilled to that length again (its last entry read then is neither there nor 0 now) is read
    from its start, so the block freed into it is taken back all the same."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    a = owner.alloc(100_000)
    a.buf[:] = pattern(a.handle, a.size)
    assert bytes(freer.view(a.handle, a.size)) == pattern(a.handle, a.size)
    freer.free(a.handle)
    a2 = owner.alloc(100_000)  # takes a back: its look stopped at the buffer's one entry
    assert a2.handle == layout.next_handle(a.handle) and owner._rseen[freer.slot][0] == 1
    freer.flush()  # the buffer applied (nothing left in it): empty
    b = owner.alloc(100_000)
    b.buf[:] = pattern(b.handle, b.size)
    assert bytes(freer.view(b.handle, b.size)) == pattern(b.handle, b.size)
    freer.free(b.handle)  # one entry again: the length the owner's last look stopped at
    c = owner.alloc(100_000)
    assert c.handle == layout.next_handle(b.handle), (
        "the owner missed the block freed into the refilled buffer"
    )
    assert arena.buffered_frees(freer.slot) == [0]
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 0
    a2.buf[:] = pattern(a2.handle, a2.size)
    c.buf[:] = pattern(c.handle, c.size)
    verify_and_free(owner, [a2, c])
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0 and snap["large_frees"] == 4
    owner.close()
    freer.close()


def fill_buffer_with_large_first(owner, freer, size, nlarge):
    """`owner` allocates `nlarge` large blocks of `size` bytes and enough 64 B blocks to fill
    `freer`'s buffer, and one more; `freer` checks and frees them all, the large ones first, and
    the hint they left their owner is cleared before the last free, which finds the buffer full
    and applies it.  Returns (large handles, small Blocks)."""
    large = [owner.alloc(size) for _ in range(nlarge)]
    small = [owner.alloc(64) for _ in range(layout.RFREE_CAP - nlarge + 1)]
    for b in large + small:
        b.buf[:] = pattern(b.handle, b.size)
    for b in large + small:
        assert bytes(freer.view(b.handle, b.size)) == pattern(b.handle, b.size)
        if b is small[-1]:
            assert owner.arena.q[owner_hint(owner)] == 1
            owner.arena.q[owner_hint(owner)] = 0
        freer.free(b.handle)
    return [b.handle for b in large], small


def owner_hint(p):
    return p.arena.lay.slot_word(p.slot) + SL["lg_rhint"]


def test_a_full_buffer_keeps_the_large_frees_their_owner_may_take_back(arena):
    """A full buffer is applied but for the frees of large blocks another P owns (RFREED): they
    stay at its start, for their owner to take back as it wants them -- none goes to its pending
    list, a list move under the heap lock each -- and the owner is told to look.  The small
    frees are applied as before."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    hs, small = fill_buffer_with_large_first(owner, freer, 100_000, 20)
    assert arena.q[owner_hint(owner)] == 1  # set again by the apply: the owner looks
    assert buffered(arena, freer) == sorted(hs) + [small[-1].handle]
    assert [arena.mv[arena.lay.amap_byte(h)] for h in hs] == [layout.RFREED] * 20
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 0
    assert {arena.mv[arena.lay.amap_byte(b.handle)] for b in small[:-1]} <= {layout.PENDING, layout.FREE}
    freer.free(owner.alloc(64))  # a free on the fast path: the kept count is the buffer's
    c = owner.alloc(100_000)
    assert c.handle in {layout.next_handle(h) for h in hs}  # taken back: no page-heap operation
    c.buf[:] = pattern(c.handle, c.size)
    snap = assert_healthy(arena, owner, freer)
    assert snap["bad_frees"] == 0 and snap["large_taken_back"] >= 1
    assert snap["large_frees"] == 20 and snap["heap_objects"] == 1
    owner.free(c)
    assert assert_healthy(arena, owner, freer)["heap_objects"] == 0
    owner.close()
    freer.close()


def test_a_large_free_kept_once_is_applied_when_the_buffer_fills_again(arena):
    """No free waits in a buffer through two applies: those a full buffer kept and their owner
    did not take back by the time it is full again go to the owner's pending list then."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    hs, _ = fill_buffer_with_large_first(owner, freer, 100_000, 20)
    assert buffered(arena, freer)[:20] == sorted(hs)
    more = [owner.alloc(64) for _ in range(layout.RFREE_CAP - 21)]
    for b in more:
        freer.free(b)  # the last fills the buffer again (20 kept, 1 + these), the next applies it
    assert arena.q[arena.lay.slot_word(freer.slot) + SL["rfree_n"]] == layout.RFREE_CAP
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 0
    freer.free(owner.alloc(64))
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 20
    assert not set(hs) & set(buffered(arena, freer))
    snap = assert_healthy(arena, owner, freer)
    assert snap["bad_frees"] == 0 and snap["large_frees"] == 20 and snap["heap_objects"] == 0
    owner.close()
    freer.close()


@pytest.mark.parametrize("n,size", [(cache.RFREE_KEEP + 1, 33_000), (10, 60 * layout.PAGE_SIZE)])
def test_a_full_buffer_applies_every_large_free_when_more_wait_than_it_keeps(arena, n, size):
    """Past RFREE_KEEP frees of large blocks waiting for their owner, or past half the pages a
    buffer's large frees may hold, a full buffer is applied whole: they go to the owner's pending
    list, and the buffer is empty for new frees."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    assert n < large_batch(freer, size)  # the pages' bound does not apply it first
    assert (n > cache.RFREE_KEEP) != (n * size > (freer._rlcap // 2) * layout.PAGE_SIZE)  # one bound
    hs, small = fill_buffer_with_large_first(owner, freer, size, n)
    assert buffered(arena, freer) == [small[-1].handle]
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == n
    snap = assert_healthy(arena, owner, freer)
    assert snap["bad_frees"] == 0 and snap["large_frees"] == n and snap["heap_objects"] == 0
    owner.close()
    freer.close()


def test_large_frees_kept_for_an_owner_that_closes_are_applied_once_later(arena):
    """An owner that closes while a full buffer keeps frees of its large blocks gives up their
    spans (its flush disowns them): the freer's next apply frees them to the heap, each once."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    hs, _ = fill_buffer_with_large_first(owner, freer, 100_000, 20)
    assert buffered(arena, freer)[:20] == sorted(hs)
    owner.close()
    assert buffered(arena, freer)[:20] == sorted(hs)  # still waiting, now for nobody
    other = ProcessCache(arena)
    snap = assert_healthy(arena, other, freer)  # the snapshot's flush applies them
    assert snap["bad_frees"] == 0 and snap["large_frees"] == 20 and snap["heap_objects"] == 0
    other.close()
    freer.close()


def test_an_owner_takes_back_all_its_large_blocks_a_burst_of_frees_left_in_another_buffer(arena):
    """An owner takes back at most what its large cache has room for at a look (8 spans); the
    blocks it left behind are found at its next allocations, with no further free to tell it:
    20 blocks freed at once come back to it through 20 allocations, none new from the heap."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(100_000) for _ in range(20)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    for b in blocks:
        assert bytes(freer.view(b.handle, b.size)) == pattern(b.handle, b.size)
        freer.free(b.handle)
    again = [owner.alloc(100_000) for _ in range(20)]
    assert sorted(b.handle for b in again) == sorted(layout.next_handle(b.handle) for b in blocks)
    assert buffered(arena, freer) == []  # every entry taken back: 0
    for b in again:
        b.buf[:] = pattern(b.handle, b.size)
    verify_and_free(owner, again)
    snap = assert_healthy(arena, owner, freer)
    assert snap["large_taken_back"] == 20 and snap["large_mallocs"] == 40 and snap["heap_objects"] == 0
    assert snap["bad_frees"] == 0
    owner.close()
    freer.close()
