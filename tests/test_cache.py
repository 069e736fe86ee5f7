"""The process cache (shm/cache.py, a P) in one process: every size class, zero sizes, frees from
another P, bad handles, double frees across caches, a closed cache, fork, threads sharing one."""

import os

import pytest
from support import assert_healthy, metadata_bytes, pattern, settle, verify_and_free

from shm import ArenaClosed, BadHandle, DoubleFree, ForkedHeap, ProcessCache, layout, read_stats_slow
from shm.sizeclasses import CLASS_TO_SIZE, MAX_SMALL_SIZE, NUM_SIZE_CLASSES


def test_every_size_class_and_large(arena):
    p = ProcessCache(arena)
    blocks = []
    for c in range(1, NUM_SIZE_CLASSES):
        size = CLASS_TO_SIZE[c]
        for s in (CLASS_TO_SIZE[c - 1] + 1, size):
            b = p.alloc(s)
            assert b.capacity == size and b.size == s
            b.buf[:] = pattern(b.handle, s)
            blocks.append(b)
    for s in (MAX_SMALL_SIZE + 1, 100_000, 1 << 20):
        b = p.alloc(s)
        assert b.capacity >= s and b.capacity % layout.PAGE_SIZE == 0
        b.buf[:] = pattern(b.handle, s)
        blocks.append(b)
    spans = sorted((b.handle, b.handle + b.capacity) for b in blocks)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "blocks overlap"
    snap = settle(arena, p)
    assert snap["heap_objects"] == len(blocks)
    assert snap["large_mallocs"] == 3 and snap["large_bytes"] == sum(b.capacity for b in blocks[-3:])
    assert snap["heap_alloc"] == sum(b.capacity for b in blocks)
    assert arena.check_all() == []
    for b in blocks:
        assert bytes(p.view(b.handle, b.size)) == pattern(b.handle, b.size)
        p.free(b)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0
    # The spans emptied by frees of objects the P no longer cached wait on their partial lists
    # for the next allocation of their class (the daemon gives them back each second).
    assert arena.free_empty_spans() > 0
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["heap_inuse"] == 0
    assert snap["mallocs"] == snap["frees"] == len(blocks)
    p.close()


def test_zero_size_gives_distinct_blocks(arena):
    p = ProcessCache(arena)
    a, b = p.alloc(0), p.alloc(0)
    assert a.handle != b.handle and a.size == 0
    p.free(a)
    p.free(b.handle)
    assert_healthy(arena, p)
    p.close()


def test_cross_process_cache_free_goes_pending_then_collected(arena):
    p1, p2 = ProcessCache(arena), ProcessCache(arena)
    blocks = [p1.alloc(64) for _ in range(10)]
    for b in blocks[:5]:
        p2.free(b)  # span cached by p1: PENDING
    # Unflushed, the slow walk already counts them free.
    slow = read_stats_slow(arena)
    assert slow["heap_objects"] == 5
    with pytest.raises(DoubleFree):
        p1.free(blocks[0])  # PENDING is free: a double free, from the owner too
    with pytest.raises(DoubleFree):
        p2.free(blocks[1])
    for b in blocks[5:]:
        p1.free(b)
    snap = assert_healthy(arena, p1, p2)
    assert snap["heap_objects"] == 0 and snap["frees"] == 10
    p1.close()
    p2.close()


def test_a_refill_collects_what_was_freed_in_the_span_it_caches_and_nothing_else(arena):
    """A refill first collects the span the P caches: the objects freed in it meanwhile (here by
    another P: PENDING) come back listed; a span handed out whole, nothing freed in it, yields
    nothing and is left unwritten (that collect writes no undo-log entry)."""
    from shm.central import CentralList
    from shm.sizeclasses import CLASS_TO_NOBJS, SIZE_TO_CLASS

    c = SIZE_TO_CLASS[4096 >> 3]
    p, other = ProcessCache(arena), ProcessCache(arena)
    first = p.alloc(4096)
    ((r,),) = [(r,) for cc, r in arena.cached_spans(p.slot) if cc == c]
    blocks = [first] + [p.alloc(4096) for _ in range(CLASS_TO_NOBJS[c] - 1)]  # r handed out whole
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    collected = []
    real = CentralList.collect

    def collect(self, op, c_, r_, k):
        used = op.log.used()
        got = real(self, op, c_, r_, k)
        collected.append((r_, len(got), op.log.used() - used))
        return got

    CentralList.collect = collect
    try:
        blocks.append(p.alloc(4096))  # a refill: r yields nothing, a new span is cached
        assert collected[0] == (r, 0, 0) and collected[1][0] != r and collected[1][1] > 0
        newr = collected[1][0]
        blocks += [p.alloc(4096) for _ in range(len(p._lists[c]))]  # the new span handed out whole
        for b in blocks[CLASS_TO_NOBJS[c] :]:
            b.buf[:] = pattern(b.handle, b.size)
        freed = blocks[-3:]
        for b in freed:
            assert bytes(other.view(b.handle, b.size)) == pattern(b.handle, b.size)
            other.free(b)  # in the span p caches: PENDING once applied
        other.flush()
        del blocks[-3:]
        collected.clear()
        again = p.alloc(4096)  # a refill: the three come back
        assert collected == [(newr, 3, collected[0][2])] and collected[0][2] > 0
        assert again.handle in [layout.next_handle(b.handle) for b in freed]
    finally:
        CentralList.collect = real
    verify_and_free(p, blocks)
    p.free(again)
    snap = assert_healthy(arena, p, other)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    p.close()
    other.close()


def test_after_a_snapshots_flush_each_p_takes_back_the_span_that_holds_its_blocks(arena):
    """A snapshot's flush gives every cached span back to its partial list, the last one flushed
    at its head; each P's next refill of that class takes back the span it had (slot last[c]),
    not the head: the blocks it allocated before the flush are its own again, and their frees
    stay local -- none waits in its remote-free buffer for the next flush to apply."""
    from shm.sizeclasses import SIZE_TO_CLASS

    c = SIZE_TO_CLASS[64 >> 3]
    ps = [ProcessCache(arena) for _ in range(3)]
    blocks = {p.slot: [p.alloc(64) for _ in range(8)] for p in ps}
    for bs in blocks.values():
        for b in bs:
            b.buf[:] = pattern(b.handle, b.size)
    had = {p.slot: dict(arena.cached_spans(p.slot))[c] for p in ps}
    assert len(set(had.values())) == 3
    arena.flush_slots([p.slot for p in ps], keep_empty=True, disown=False)
    assert all(not arena.cached_spans(p.slot) for p in ps)
    head = arena.q[arena.central.head_w(c, layout.LIST_PARTIAL)] - 1
    assert head == had[ps[-1].slot]  # the others' spans wait behind it
    fresh = []
    for p in ps:
        fresh.append(p.alloc(64))  # the refill after the flush
        assert dict(arena.cached_spans(p.slot))[c] == had[p.slot]
        assert arena.q[arena.lay.slot_word(p.slot) + layout.SLOT_LAST_AT + c] == 0  # the hint is spent
        verify_and_free(p, blocks[p.slot])
        assert arena.buffered_frees(p.slot) == []  # every free was local
    for p, b in zip(ps, fresh):
        p.free(b)
    snap = assert_healthy(arena, *ps)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    for p in ps:
        p.close()


def test_a_p_does_not_take_back_a_span_another_p_took_after_the_flush(arena):
    """The span a flush took from P a is cached by P b (which had none of that class) before a
    refills: a's hint names a span that no longer waits on the partial list, and a's refill takes
    the list's head instead (the span a flush took from P d), leaving b's alone."""
    from shm.sizeclasses import SIZE_TO_CLASS

    c = SIZE_TO_CLASS[64 >> 3]
    a, d = ProcessCache(arena), ProcessCache(arena)
    mine, ds = [a.alloc(64) for _ in range(8)], [d.alloc(64) for _ in range(8)]
    r, rd = dict(arena.cached_spans(a.slot))[c], dict(arena.cached_spans(d.slot))[c]
    arena.flush_slots([a.slot], keep_empty=True, disown=False)
    b = ProcessCache(arena)
    theirs = [b.alloc(64) for _ in range(8)]  # takes the partial list's head: r
    assert dict(arena.cached_spans(b.slot))[c] == r
    arena.flush_slots([d.slot], keep_empty=True, disown=False)  # rd waits at the head now
    assert arena.q[arena.lay.slot_word(a.slot) + layout.SLOT_LAST_AT + c] == r + 1
    again = a.alloc(64)  # its hint names r, which b caches
    assert dict(arena.cached_spans(a.slot))[c] == rd
    assert dict(arena.cached_spans(b.slot))[c] == r
    blocks = mine + ds + theirs + [again]
    for blk in blocks:
        blk.buf[:] = pattern(blk.handle, blk.size)
    verify_and_free(a, mine)  # in the span b caches: remote frees
    assert len(arena.buffered_frees(a.slot)) == len(mine)
    verify_and_free(d, ds)  # in the span a caches now: remote frees too
    verify_and_free(b, theirs)
    verify_and_free(a, [again])
    snap = assert_healthy(arena, a, b, d)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    for p in (a, b, d):
        p.close()


def test_sigkill_while_a_p_takes_back_its_span_rolls_back_the_step(make_arena):
    """A P killed half way through the step that takes its span back out of the middle of the
    partial list (the hint a flush left in its slot): the next taker of the central lock rolls
    the step back -- the list whole again, the hint as it was -- the dead P is reclaimed, and
    no block is handed out twice."""
    import mpworkers
    from support import DEADLINE, kill_and_repair, spawn_victim

    from shm.sizeclasses import SIZE_TO_CLASS

    c = SIZE_TO_CLASS[64 >> 3]
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    victim, ready, out = spawn_victim(mpworkers.stuck_taking_back_its_span, arena.name)
    handles, k, r = out.get(timeout=DEADLINE)
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    assert arena.q[arena.lay.lock_word(layout.LOCK_CENTRAL(c))], "the victim should hold the lock, dirty"
    mine = [kill_and_repair(arena, victim, lambda: main.alloc(64))]  # takes central[64 B]
    assert arena.q[arena.lay.slot_word(k) + layout.SLOT_LAST_AT + c] == r + 1  # rolled back
    assert arena.check_all() == []
    mine += [main.alloc(64) for _ in range(300)]  # more than the spans the victim left hold
    for b in mine:
        b.buf[:] = pattern(b.handle, b.size)
    for h in handles:  # the victim's blocks, live (it never freed them): untouched
        assert bytes(main.view(h, 64)) == pattern(h, 64)
    verify_and_free(main, mine)
    snap = assert_healthy(arena, main)  # reclaims the victim's Ps
    assert snap["heap_objects"] == len(handles) and snap["bad_frees"] == 0
    main.close()


BAD = [
    ("below the heap", lambda a, b: layout.HANDLE_MIN - 1, BadHandle),
    ("zero", lambda a, b: 0, BadHandle),
    ("past the heap", lambda a, b: (layout.HANDLE_G0 + a.lay.amap_bytes) << layout.GEN_BITS, BadHandle),
    ("negative", lambda a, b: -8, BadHandle),
    ("wrong generation", lambda a, b: b["small"].handle ^ 0x55, BadHandle),
    ("inside a small block", lambda a, b: b["small"].handle + (1 << layout.GEN_BITS), BadHandle),
    ("inside a large block", lambda a, b: b["large"].handle + (512 << layout.GEN_BITS), BadHandle),
    ("never allocated page", lambda a, b: a.lay.make_handle(a.lay.heap_max - 8192, 0, 0), BadHandle),
    ("never allocated page, fine", lambda a, b: a.lay.make_handle(a.lay.heap_max - 8192, 0, 1), BadHandle),
    ("free object", lambda a, b: b["freed"], DoubleFree),
    ("freed large", lambda a, b: b["freed_large"], DoubleFree),
    ("stale (reused)", lambda a, b: b["stale"], BadHandle),
    ("stale large (reused)", lambda a, b: b["stale_large"], BadHandle),
    ("not an int", lambda a, b: "12345", BadHandle),
    ("float", lambda a, b: float(b["small"].handle), BadHandle),
]


@pytest.mark.parametrize("what,make,exc", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("who", ["owner", "other"])
def test_bad_handles_change_nothing(arena, what, make, exc, who):
    p1, p2 = ProcessCache(arena), ProcessCache(arena)
    blocks = {"small": p1.alloc(48), "large": p1.alloc(100_000)}
    f = p1.alloc(48)
    blocks["freed"] = f.handle
    p1.free(f)
    g = p1.alloc(50_000)
    blocks["freed_large"] = g.handle
    p1.free(g)
    for key, size in (("stale", 8), ("stale_large", 40_000)):
        s = p1.alloc(size)
        p1.free(s)
        blocks[key + "_again"] = again = p1.alloc(size)  # the same address, reused
        assert arena.lay.handle_offset(again.handle) == arena.lay.handle_offset(s.handle)
        blocks[key] = s.handle
    before = metadata_bytes(arena)
    with pytest.raises(exc) as err:
        (p1 if who == "owner" else p2).free(make(arena, blocks))
    if what.startswith("stale"):
        assert err.type is BadHandle and "stale" in str(err.value)
    assert metadata_bytes(arena) == before, f"a bad free ({what}) changed the arena"
    if what not in ("not an int", "float"):
        with pytest.raises(BadHandle):
            p2.view(make(arena, blocks))
    for key in ("small", "large", "stale_again", "stale_large_again"):
        p1.free(blocks[key])
    assert_healthy(arena, p1, p2)
    p1.close()
    p2.close()


def test_double_free_across_two_processes_caches(arena):
    p1, p2 = ProcessCache(arena), ProcessCache(arena)
    b, neighbour = p1.alloc(200), p1.alloc(200)
    p1.flush()  # span uncached: b is ALLOC in a central span
    p2.free(b.handle)
    before = metadata_bytes(arena)
    for p in (p1, p2):
        with pytest.raises(DoubleFree):
            p.free(b.handle)
    assert metadata_bytes(arena) == before
    p2.free(neighbour)
    p2.flush()  # p2's buffered frees applied: the span is empty now, on its partial list
    assert arena.free_empty_spans() == 1  # and back in the heap, as the daemon does each second
    with pytest.raises(DoubleFree, match="span went back to the heap"):
        p1.free(neighbour.handle)  # its generation byte outlives the span: still a double free
    assert_healthy(arena, p1, p2)
    p1.close()
    p2.close()


def test_closed_heap_refuses(arena):
    p = ProcessCache(arena)
    p.close()
    with pytest.raises(ArenaClosed):
        p.alloc(10)
    with pytest.raises(ArenaClosed):
        p.free(12345)


def test_fork_child_gets_a_clear_error(arena):
    p = ProcessCache(arena)
    b = p.alloc(100)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            try:
                p.alloc(100)
                msg = b"NO ERROR"
            except ForkedHeap as e:
                msg = b"ForkedHeap " + str(e).encode()
            try:
                p.free(b)
                msg += b" / free: NO ERROR"
            except ForkedHeap:
                msg += b" / free: ForkedHeap"
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert out.startswith(b"ForkedHeap") and out.endswith(b"free: ForkedHeap"), out
    p.free(b)  # the parent's P is untouched
    assert_healthy(arena, p)
    p.close()


def test_threads_sharing_one_cache_switch_it_to_shared_mode(arena):
    """The fast path belongs to the thread that made the cache; other threads may use it too,
    through the locked path, and nothing is lost or handed out twice."""
    import random
    import threading

    p = ProcessCache(arena)
    owner_blocks = [p.alloc(64) for _ in range(50)]  # the owner's fast path, before any sharing
    assert not p.shared
    errors, handed = [], []
    lock = threading.Lock()

    def work(seed):
        rnd = random.Random(seed)
        mine = []
        try:
            for _ in range(3000):
                if mine and rnd.random() < 0.5:
                    b = mine.pop(rnd.randrange(len(mine)))
                    assert bytes(b.buf) == pattern(b.handle, b.size), "a block was overwritten"
                    p.free(b)
                else:
                    b = p.alloc(rnd.choice([8, 64, 200, 3000, 40_000]))
                    b.buf[:] = pattern(b.handle, b.size)
                    mine.append(b)
                    with lock:
                        handed.append(b.handle)
            verify_and_free(p, mine)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    work(99)  # the owner works at the same time
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert p.shared
    for b in owner_blocks:
        p.free(b)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["mallocs"] == len(handed) + len(owner_blocks)
    p.close()
