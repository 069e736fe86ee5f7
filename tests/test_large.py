"""Large objects (shm/large.py): a span owned by the P that allocated it, kept in that P's cache
when it frees it (a pair of any size takes no lock), given back by a flush, freed by another P
through PENDING; the cache's bound; a process killed while its large cache is flushed."""

import multiprocessing as mp

import mpworkers
import pytest
from support import DEADLINE, assert_healthy, kill_and_repair, metadata_bytes, pattern, spawn_victim

from shm import BadHandle, DoubleFree, ProcessCache, layout
from shm.arena import LARGE_STEP

SL, PAGE = layout.SLOT, layout.PAGE_SIZE


def owned(arena, p):
    return arena.large.owned(p.slot)


@pytest.mark.parametrize("size", [32769, 1 << 20, 16 << 20])
def test_a_large_pair_reuses_its_span_without_a_lock(make_arena, size):
    arena = make_arena(heap_max=256 << 20)
    p = ProcessCache(arena)
    b = p.alloc(size)
    b.buf[:] = pattern(b.handle, size)
    p.free(b)
    ops, run = [], arena.run
    arena.run = lambda actor, fn: ops.append(fn) or run(actor, fn)  # every locked operation
    h = b.handle
    for _ in range(3):
        x = p.alloc(size)
        h = layout.next_handle(h)  # the same address, the next generation
        assert x.handle == h, "the freed span should come back from the P's cache"
        p.free(x)
    x = p.alloc(size)
    assert x.handle == layout.next_handle(h)
    assert ops == [], "a large pair from the P's cache takes no lock"
    del arena.run
    assert len(owned(arena, p)) == 1
    assert arena.q[arena.lay.slot_word(p.slot) + SL["lg_relists"]] == 4  # counted ahead, settled at flush
    p.free(x)
    snap = assert_healthy(arena, p)
    assert snap["large_mallocs"] == 5 and snap["large_frees"] == 5 and snap["heap_objects"] == 0
    assert snap["heap_inuse"] == 0 and owned(arena, p) == []
    p.close()


def test_the_large_cache_is_bounded(make_arena):
    arena = make_arena(heap_max=64 << 20)  # the cache keeps at most a quarter: 16 MiB
    p = ProcessCache(arena)
    blocks = [p.alloc(6 << 20) for _ in range(4)]
    for b in blocks:
        p.free(b)
    listed = [r for r in owned(arena, p)]
    assert len(listed) == 2, "two 6 MiB spans fit in 16 MiB; the others go back to the heap"
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == 4
    p.close()


def test_a_large_block_freed_by_another_p_goes_back_through_its_owner(arena):
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    b, keep = owner.alloc(100_000), owner.alloc(200_000)
    freer.free(b)
    with pytest.raises(DoubleFree):
        owner.free(b)  # RFREED: the owner's fast path refuses it
    freer.flush()  # applied: PENDING for its owner
    off = arena.lay.amap_byte(b.handle)
    assert arena.mv[off] == layout.PENDING
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 1
    before = metadata_bytes(arena)
    for p in (owner, freer):
        with pytest.raises(DoubleFree):
            p.free(b)
    assert metadata_bytes(arena) == before
    assert [arena.large.base(r) for r in arena.large.pending(owner.slot)] == [layout.next_handle(b.handle)]
    pages_w = arena.lay.slot_word(owner.slot) + SL["lg_pend_pages"]
    arena.q[pages_w] += 1  # the check holds the count and the pages to the list
    assert any("pending list holds 1 spans" in x for x in arena.check_all(["large"]))
    arena.q[pages_w] -= 1
    c = owner.alloc(300_000)  # a large slow path: the PENDING span goes into the owner's cache
    assert arena.q[arena.lay.slot_word(owner.slot) + SL["lg_pending"]] == 0
    assert arena.mv[off] == layout.LISTED
    again = owner.alloc(100_000)  # the same size: the span the other P freed, without a lock
    assert again.handle == layout.next_handle(b.handle)  # the same address, the next generation
    with pytest.raises(BadHandle, match="stale"):
        freer.free(b)  # the freer's old handle no longer frees the block its owner reuses
    again.buf[:] = pattern(again.handle, 100_000)
    for x in (c, keep, again):
        owner.free(x)
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["large_mallocs"] == 4 and snap["large_frees"] == 4
    assert snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_a_large_double_free_by_the_owner_is_caught(arena):
    p = ProcessCache(arena)
    b = p.alloc(50_000)
    p.free(b)  # LISTED in the P's large cache
    before = metadata_bytes(arena)
    with pytest.raises(DoubleFree):
        p.free(b)
    assert metadata_bytes(arena) == before
    assert_healthy(arena, p)
    p.close()


@pytest.mark.slow
def test_sigkill_while_flushing_the_large_cache_is_rolled_back(make_arena):
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    victim = ctx.Process(target=mpworkers.stuck_flushing_large, args=(arena.name, ready))
    victim.start()
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    assert arena.q[arena.lay.lock_word(layout.LOCK_HEAP)], "the victim should hold the heap lock, dirty"
    b = kill_and_repair(arena, victim, lambda: main.alloc(100_000))  # takes the heap lock
    main.free(b)
    snap = assert_healthy(arena, main)  # the victim reclaimed: its cache flushed, once
    # It kept one of its three large blocks allocated; the two it freed are free again, counted
    # once (the rolled-back span was settled again by the reclaim); plus main's own pair.
    assert snap["heap_objects"] == 1 and snap["large_mallocs"] == 4 and snap["large_frees"] == 3
    main.close()


@pytest.mark.parametrize("where", ["free", "collect"])
def test_sigkill_while_moving_a_span_to_or_from_the_pending_list_is_rolled_back(make_arena, where):
    """A span another P freed moves from its owner's list to the owner's pending list (marked
    PENDING), and back when the owner takes it again, each move one logged step.  A process
    killed half way through the step of either move leaves nothing half done."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    victim, ready, handles = spawn_victim(mpworkers.stuck_in_pending_list, arena.name, where)
    if where == "free":
        blocks = [main.alloc(100_000) for _ in range(3)]
        for b in blocks:
            b.buf[:] = pattern(b.handle, b.size)
        handles.put([b.handle for b in blocks[:2]])
        kept = blocks[2]
    else:
        hs = handles.get(timeout=DEADLINE)
        for h in hs:
            main.free(h)
        main.flush()  # applied: PENDING for the victim
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    assert arena.q[arena.lay.lock_word(layout.LOCK_HEAP)], "the victim should hold the heap lock, dirty"
    b = kill_and_repair(arena, victim, lambda: main.alloc(200_000))  # takes the heap lock
    main.free(b)
    snap = assert_healthy(arena, main)  # the victim reclaimed: its buffer applied once
    if where == "free":
        assert bytes(main.view(kept.handle, kept.size)) == pattern(kept.handle, kept.size)
        main.free(kept)
        assert snap["large_frees"] == 3 and snap["heap_objects"] == 1  # b, and the two it freed
    else:
        assert snap["large_frees"] == 4 and snap["heap_objects"] == 0  # its three, and b
    assert snap["bad_frees"] == 0
    snap = assert_healthy(arena, main)
    assert snap["heap_objects"] == 0 and snap["heap_inuse"] == 0
    main.close()


@pytest.mark.parametrize("where", ["half", "bytes"])
def test_sigkill_while_taking_large_blocks_back_rolls_back_one_step(make_arena, where):
    """An owner takes its large blocks back out of the remote-free buffer of the P that freed
    them in one step: the buffer's entries 0, the blocks LISTED and counted as its local frees
    would be.  A process killed inside that step (half its words stored, or all but its map
    bytes) leaves none of it: the three frees still wait in the buffer, and that P's flush
    frees them -- every free once, none bad."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    victim, ready, handles = spawn_victim(mpworkers.stuck_taking_back, arena.name, where)
    hs = handles.get(timeout=DEADLINE)
    for h in hs:
        assert bytes(main.view(h, 100_000)) == pattern(h, 100_000)
        main.free(h)
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    assert arena.q[arena.lay.lock_word(layout.LOCK_HEAP)], "the victim should hold the heap lock, dirty"
    assert arena.buffered_frees(main.slot)[0] == 0  # the step under way: the first entry 0
    b = kill_and_repair(arena, victim, lambda: main.alloc(200_000))  # takes the heap lock
    assert arena.buffered_frees(main.slot) == hs  # the step rolled back
    assert [arena.mv[arena.lay.amap_byte(h)] for h in hs] == [layout.RFREED] * 3
    main.free(b)
    snap = assert_healthy(arena, main)  # the victim reclaimed, the buffer applied
    assert snap["large_mallocs"] == 4 and snap["large_frees"] == 4 and snap["heap_objects"] == 0
    assert snap["bad_frees"] == 0 and snap["heap_inuse"] == 0
    main.close()


@pytest.mark.parametrize("nth", [3, LARGE_STEP + 2])
def test_sigkill_while_applying_frees_of_large_blocks_rolls_back_one_step(make_arena, nth):
    """A P's buffered frees of another P's large blocks are applied LARGE_STEP a step, each step
    checkpointed with the buffer's count below it.  A process killed inside a step (the `nth`
    free applied) loses that step only: it is rolled back, and the reclaim applies it and the
    rest -- every free once, the owner's blocks intact."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    victim, ready, handles = spawn_victim(mpworkers.stuck_applying_large_frees, arena.name, nth)
    n = 2 * LARGE_STEP + 4
    blocks = [main.alloc(100_000) for _ in range(n + 1)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    kept = blocks.pop()
    handles.put([b.handle for b in blocks])
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    assert arena.q[arena.lay.lock_word(layout.LOCK_HEAP)], "the victim should hold the heap lock, dirty"
    (k,) = [k for k in arena.registry.active_slots() if arena.registry.pid(k) == victim.pid]
    left = arena.q[arena.lay.slot_word(k) + layout.SLOT["rfree_n"]]
    assert left == n - (nth - 1) // LARGE_STEP * LARGE_STEP  # the steps before nth's: applied
    b = kill_and_repair(arena, victim, lambda: main.alloc(200_000))  # takes the heap lock
    main.free(b)
    snap = assert_healthy(arena, main)  # the victim reclaimed: its buffer applied, once
    assert snap["large_frees"] == n + 1 and snap["heap_objects"] == 1 and snap["bad_frees"] == 0
    assert bytes(main.view(kept.handle, kept.size)) == pattern(kept.handle, kept.size)
    main.free(kept)
    snap = assert_healthy(arena, main)
    assert snap["heap_objects"] == 0 and snap["heap_inuse"] == 0
    main.close()


def test_a_snapshot_leaves_live_large_blocks_owned_and_freed_ones_given_back(arena):
    """The daemon's flush (disown=False) settles the large cache but keeps the P's live large
    blocks owned: a snapshot costs nothing per live block, and the P frees them without a lock."""
    from shm import world

    p = ProcessCache(arena)
    live = [p.alloc(100_000) for _ in range(3)]
    gone = p.alloc(100_000)
    p.free(gone)  # LISTED in the P's large cache
    stw = world.StopTheWorld(arena, asymmetric=False)
    stw.begin(1)
    arena.flush_slots([p.slot], keep_empty=True, disown=False)
    stw.end({p.slot})
    assert sorted(arena.large.base(r) for r in owned(arena, p)) == sorted(b.handle for b in live)
    snap = arena.read_stats()
    assert snap["large_mallocs"] == 4 and snap["large_frees"] == 1 and snap["heap_objects"] == 3
    ops, run = [], arena.run
    arena.run = lambda actor, fn: ops.append(fn) or run(actor, fn)
    p.free(live[0])  # resyncs through the slow path (no lock), then frees into the large cache
    p.free(live[1])
    assert ops == [], "an owned large block is freed without a locked operation after a snapshot"
    del arena.run
    p.free(live[2])
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == 4
    p.close()


def test_the_large_cache_keeps_at_most_eight_spans(make_arena):
    """A snapshot gives every span in a P's large cache back to the page heap during its pause:
    however small they are, a P keeps at most LARGE_CACHE_SPANS of them."""
    from shm.cache import LARGE_CACHE_SPANS

    arena = make_arena(heap_max=256 << 20)
    p = ProcessCache(arena)
    blocks = [p.alloc(40_000 + 8192 * i) for i in range(20)]  # 20 different page counts
    for b in blocks:
        p.free(b)
    cached = [r for r in owned(arena, p)]
    assert len(cached) == LARGE_CACHE_SPANS == 8
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == 20
    p.close()


def test_a_cache_full_of_another_size_makes_room_for_the_size_taken_back(arena):
    """A P whose large cache is full of spans of one size, and which now wants another, gives
    the stale ones back to the heap when it takes back the spans of the new size that another
    P freed -- it would otherwise allocate every one from the page heap until a flush."""
    from shm import cache

    owner, freer = ProcessCache(arena), ProcessCache(arena)
    old = [owner.alloc(100_000) for _ in range(cache.LARGE_CACHE_SPANS)]
    for b in old:
        owner.free(b)  # LISTED: the cache is full
    assert sum(len(v) for v in owner._lcache.values()) == cache.LARGE_CACHE_SPANS
    new = owner.alloc(300_000)
    freer.free(new.handle)
    freer.flush()  # applied: PENDING for its owner
    again = owner.alloc(300_000)  # takes it back, making room
    assert again.handle == layout.next_handle(new.handle), "the span another P freed, reused"
    pages = -(-300_000 // layout.PAGE_SIZE)
    assert not any(owner._lcache.get(n) for n in owner._lcache if n != pages), owner._lcache
    again.buf[:] = pattern(again.handle, again.size)
    assert bytes(again.buf) == pattern(again.handle, again.size)
    owner.free(again)
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    owner.close()
    freer.close()


@pytest.mark.parametrize(
    "room, least, want",
    [(100, 0, 5), (14, 0, 7), (20, 6, 5), (9, 0, 9), (4, 0, 5), (21, 0, 0), (23, 0, 7), (30, 8, 7)],
)
def test_taking_back_pending_spans_takes_the_size_wanted_first_as_room_allows(arena, room, least, want):
    """collect_pending, against a plain model of its rule: the spans of `want` pages first, then
    the others, each in the pending list's order (newest first), each taken if its charge
    (its pages, `least` at least) fits what is left of `room`.  It walks the list only as far
    as a span may still fit; the result is the rule's."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    sizes = [5, 7, 5, 5, 7, 9, 5, 7, 5, 5]  # pages: every block large
    blocks = [owner.alloc(n * layout.PAGE_SIZE - 100) for n in sizes]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    for b in blocks:
        freer.free(b.handle)
    freer.flush()  # applied: every span PENDING on the owner's pending list
    lay, k = arena.lay, owner.slot
    pending = arena.large.pending(k)
    npages = {r: arena.q[lay.span_word(r) + layout.SPAN["npages"]] for r in pending}
    left, want_kept = room, []
    for r in [r for r in pending if npages[r] == want] + [r for r in pending if npages[r] != want]:
        if max(npages[r], least) <= left:
            left -= max(npages[r], least)
            want_kept.append((arena.large.base(r), npages[r]))

    def collect(op):
        op.acquire(layout.LOCK_HEAP)
        return arena.large.collect_pending(op, k, room, least, 1 << 30, 1 << 30, want)

    kept, gone = arena.run(k, collect)
    assert kept == want_kept and gone == []
    assert [r for r in pending if (arena.large.base(r), npages[r]) not in kept] == arena.large.pending(k)
    for h, _ in kept:
        assert arena.mv[lay.amap_byte(h)] == layout.LISTED
    assert arena.check_all(["large"]) == []
    owner._drop_local()  # its cache does not know the spans taken back behind its back
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == len(blocks) and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_a_p_that_moves_on_to_another_size_makes_room_at_a_free_and_its_pairs_take_no_lock(make_arena):
    """Its large cache full of spans of 4 MiB, a P moves on to 256 KiB blocks.  The first free
    of one gives back the oldest 4 MiB span (one locked operation, as the free to the heap
    would be) and keeps the new one, so the pairs from then on take no lock -- before, every
    pair took the heap lock twice (alloc and free) until a flush emptied the cache."""
    from shm import cache

    arena = make_arena(heap_max=128 << 20)  # the cache: 32 MiB, 8 spans of at least 4 MiB each
    p = ProcessCache(arena)
    old = [p.alloc(4 << 20) for _ in range(cache.LARGE_CACHE_SPANS)]
    for b in old:
        p.free(b)
    assert sum(len(v) for v in p._lcache.values()) == cache.LARGE_CACHE_SPANS
    ops, run = [], arena.run
    arena.run = lambda actor, fn, gate=None: ops.append(fn) or run(actor, fn, gate)
    for i in range(10):
        b = p.alloc(256 << 10)
        b.buf[:] = pattern(b.handle, b.size)
        assert bytes(b.buf) == pattern(b.handle, b.size)
        p.free(b)
        if i == 0:
            assert len(ops) == 2, "the first pair: its span from the heap, and room made"
    del arena.run
    assert len(ops) == 2, f"{len(ops) - 2} locked operations in the 9 pairs after the first"
    pages = {n: len(hs) for n, hs in p._lcache.items() if hs}
    assert pages == {512: cache.LARGE_CACHE_SPANS - 1, 32: 1}, pages
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == cache.LARGE_CACHE_SPANS + 10
    p.close()
