"""Generational handles (shm/layout.py): a handle carries its object's generation byte, bumped
each time the object is freed, so a stale handle -- its block freed and the address reused --
never frees or views the new block, in one process, across two, or through a remote-free buffer;
the second free of a block says DoubleFree even after its span went back to the page heap; a
process killed between the generation bump and the rest of a fast-path free leaves the arena
consistent."""

import multiprocessing as mp
import os
import random
import signal

import mpworkers
import pytest
from support import DEADLINE, assert_healthy, metadata_bytes, pattern, verify_and_free

from shm import BadHandle, DoubleFree, ProcessCache, layout

SPAWN = mp.get_context("spawn")


def reused(p, size):
    """(stale handle, live Block at the same address): p frees a block and gets its memory back."""
    b = p.alloc(size)
    p.free(b)
    again = p.alloc(size)
    assert again.handle >> layout.GEN_BITS == b.handle >> layout.GEN_BITS, "the address is reused"
    assert again.handle == layout.next_handle(b.handle) != b.handle
    again.buf[:] = pattern(again.handle, size)
    return b.handle, again


@pytest.mark.parametrize("size", [64, 100_000])
def test_a_stale_handle_never_frees_or_views_the_reused_block(arena, size):
    owner, other = ProcessCache(arena), ProcessCache(arena)
    stale, again = reused(owner, size)
    before = metadata_bytes(arena)
    for p in (owner, other):
        for call in (p.free, p.view):
            with pytest.raises(BadHandle, match="stale") as err:
                call(stale)
            assert err.type is BadHandle  # not a DoubleFree: the block is live, with another handle
    assert metadata_bytes(arena) == before, "a stale free changed the arena"
    assert arena.buffered_frees(other.slot) == []
    assert bytes(other.view(again)[:size]) == pattern(again.handle, size)
    owner.free(again)
    snap = assert_healthy(arena, owner, other)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    owner.close()
    other.close()


def test_a_stale_free_from_another_process_fails_at_the_call(arena):
    """P A frees X and gets X back; process B frees X with the old handle: BadHandle in B, and
    A's block stays allocated (A's next allocations never hand X out while A holds it)."""
    a = ProcessCache(arena)
    stale, again = reused(a, 64)
    out = SPAWN.Queue()
    b = SPAWN.Process(target=mpworkers.free_stale_handle, args=(arena.name, stale, out))
    b.start()
    freed, viewed, buffered = out.get(timeout=DEADLINE)
    b.join(DEADLINE)
    assert freed[0] == "BadHandle" and "stale" in freed[1]
    assert viewed[0] == "BadHandle" and "stale" in viewed[1]
    assert buffered == [], "the stale free never reached B's remote-free buffer"
    more = [a.alloc(64) for _ in range(300)]
    assert all(m.handle >> layout.GEN_BITS != again.handle >> layout.GEN_BITS for m in more)
    assert bytes(a.view(again))[:64] == pattern(again.handle, 64)
    for m in more + [again]:
        a.free(m)
    snap = assert_healthy(arena, a)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    a.close()


def test_a_late_buffered_free_that_meets_the_block_reused_is_skipped(arena):
    """B buffers a free of X (valid then); its hint is lost to a retag, so A frees X too and gets
    it back.  When B's buffer is applied, X carries the next generation: B's free is stale --
    skipped and counted, and A's block stays allocated."""
    a, b = ProcessCache(arena), ProcessCache(arena)
    x = a.alloc(64)
    b.free(x)
    arena.mv[arena.lay.amap_byte(x.handle)] = layout.TAG0 + a.slot  # the hint is lost...
    a.free(x)  # ...so A's own free goes through, and A gets X back
    again = a.alloc(64)
    assert again.handle == layout.next_handle(x.handle)
    again.buf[:] = pattern(again.handle, 64)
    b.flush()  # B's buffer applied: found stale
    assert arena.q[arena.lay.heap_word() + layout.HEAP["bad_frees"]] == 1
    assert arena.mv[arena.lay.amap_byte(again.handle)] == layout.TAG0 + a.slot, "X stayed A's"
    snap = assert_healthy(arena, a, b)
    assert snap["heap_objects"] == 1 and snap["bad_frees"] == 1
    assert bytes(a.view(again)[:64]) == pattern(again.handle, 64)
    a.free(again)
    assert assert_healthy(arena, a, b)["heap_objects"] == 0
    a.close()
    b.close()


@pytest.mark.parametrize("size", [64, 100_000])
def test_a_second_free_after_the_span_went_back_to_the_heap_is_a_double_free(arena, size):
    p, other = ProcessCache(arena), ProcessCache(arena)
    b = p.alloc(size)
    other.free(b)
    other.flush()  # applied: the span is empty (or the large span PENDING for p)
    p.flush()  # p gives back what it cached: the span goes back to the page heap
    assert arena.heap.span_of_page(arena.lay.handle_page(b.handle)) < 0
    before = metadata_bytes(arena)
    for q in (p, other):
        with pytest.raises(DoubleFree, match="span went back to the heap"):
            q.free(b.handle)
        with pytest.raises(BadHandle):
            q.view(b.handle)
    assert metadata_bytes(arena) == before
    assert_healthy(arena, p, other)
    p.close()
    other.close()


@pytest.mark.parametrize("size", [64, 128, 100_000])  # fine, coarse, large: each fast free wraps
def test_one_address_gets_256_distinct_handles_before_one_repeats(arena, size):
    p = ProcessCache(arena)
    seen = []
    for _ in range(257):
        b = p.alloc(size)
        seen.append(b.handle)
        p.free(b)
    assert len({h >> layout.GEN_BITS for h in seen}) == 1
    assert len(set(seen[:256])) == 256, "the last 255 handles of an address all differ from its current one"
    assert seen[256] == seen[0]  # 8 bits: the 257th reuse wraps
    assert_healthy(arena, p)
    p.close()


def test_random_ints_and_every_wrong_generation_raise_bad_handle(arena):
    p, other = ProcessCache(arena), ProcessCache(arena)
    live = [p.alloc(64), p.alloc(3000), p.alloc(100_000)]
    before = metadata_bytes(arena)
    for b in live:  # the 255 other generations of a live block's address
        for gen in range(256):
            h = b.handle & ~layout.GEN_MASK | gen
            if h == b.handle:
                continue
            for q in (p, other):
                with pytest.raises(BadHandle):
                    q.free(h)
                with pytest.raises(BadHandle):
                    q.view(h)
    rng = random.Random(7)
    top = (layout.HANDLE_G0 + arena.lay.amap_bytes) << (layout.GEN_BITS + 1)
    for _ in range(2000):
        h = rng.randrange(-top, top)
        if h in {b.handle for b in live}:
            continue
        with pytest.raises(BadHandle):
            other.free(h)
    assert metadata_bytes(arena) == before
    for b in live:
        p.free(b)
    assert_healthy(arena, p, other)
    p.close()
    other.close()


def killed_inside_a_fast_free(make_arena, before, size=64, after=None):
    """A victim P frees a block of `size` bytes on the fast path and is SIGKILLed just before
    the statement `before` (mpworkers.stuck_in_fast_free), the block's generation already
    bumped.  Returns (arena, a live P, the handle it was freeing, the snapshot after the
    victim's reclaim -- the arena healthy, its slot free)."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    ready, out = SPAWN.Event(), SPAWN.Queue()
    victim = SPAWN.Process(
        target=mpworkers.stuck_in_fast_free, args=(arena.name, before, ready, out, size, after)
    )
    victim.start()
    slot, h = out.get(timeout=DEADLINE)
    assert ready.wait(DEADLINE), "victim never reached the statement"
    assert arena.mv[arena.lay.gmap_byte(h)] == layout.next_handle(h) & layout.GEN_MASK
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    snap = assert_healthy(arena, main)  # reclaims the victim's slot
    assert slot not in arena.registry.active_slots()
    return arena, main, h, snap


@pytest.mark.parametrize("before", ["relists[c] += 1", "amap[i] = LISTED", "lists[c].append(h + 1)"])
def test_sigkill_between_the_generation_bump_and_the_rest_of_a_fast_free(make_arena, before):
    """The victim dies inside a fast-path free after its generation store, at each later store.
    The arena stays consistent (check passes after its reclaim) and the handle it was freeing
    never names a live block again: its generation was bumped first."""
    arena, main, h, snap = killed_inside_a_fast_free(make_arena, before)
    # Killed before its LISTED store the block stays allocated (a dead P's blocks do); after it,
    # it is free.  Either way the old handle frees nothing.
    leaked = before == "relists[c] += 1" or before == "amap[i] = LISTED"
    assert snap["heap_objects"] == (1 if leaked else 0)
    with pytest.raises(BadHandle):
        main.free(h)
    got = [main.alloc(64) for _ in range(600)]
    assert h not in {b.handle for b in got}
    for b in got:
        main.free(b)
    assert_healthy(arena, main)
    main.close()


@pytest.mark.parametrize(
    "before",
    ["lgrel[0] += 1", "lgrel[1] += npg", "amap[i] = LISTED", "lst = lcache.get(npg)", "lcached += ch"],
)
def test_sigkill_inside_a_large_blocks_fast_free(make_arena, before):
    """The same for a large block freed into its P's large cache (the free's own branch for it):
    killed after the generation store, at each later one.  Before LISTED the block stays
    allocated, after it it is free; the arena is consistent either way and the old handle frees
    nothing."""
    size = 1 << 20
    arena, main, h, snap = killed_inside_a_fast_free(make_arena, before, size, "Ours and large")
    leaked = before in ("lgrel[0] += 1", "lgrel[1] += npg", "amap[i] = LISTED")
    assert snap["heap_objects"] == (1 if leaked else 0)
    # Two blocks allocated; the re-list counted ahead stays counted when the block did not
    # become LISTED (over-counted by one, never under), and is taken back when it did.
    assert snap["large_mallocs"] == 2 + (before in ("lgrel[1] += npg", "amap[i] = LISTED"))
    with pytest.raises(BadHandle):
        main.free(h)
    b = main.alloc(size)
    assert b.handle != h
    main.free(b)
    assert_healthy(arena, main)
    main.close()


def test_check_names_a_buffered_free_whose_generation_moved(arena):
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    b = owner.alloc(64)
    freer.free(b)  # buffered: the object keeps its generation until the free is applied
    assert arena.check_all() == []
    g = arena.lay.gmap_byte(b.handle)
    arena.mv[g] = (arena.mv[g] + 1) & layout.GEN_MASK  # as if it had been freed meanwhile
    assert any("not its object's generation" in x for x in arena.check_all())
    arena.mv[g] = (arena.mv[g] - 1) & layout.GEN_MASK
    assert arena.check_all() == []
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def refused_then_freed(arena, p, first, again, blocks):
    """The stale handle `first` is refused by free and view, the block `again` now at its
    address keeps its pattern, and every block of `blocks` frees; then P p closes."""
    again.buf[:] = pattern(again.handle, again.size)
    for call in (p.free, p.view):
        with pytest.raises(BadHandle):
            call(first.handle)
    assert bytes(again.buf) == pattern(again.handle, again.size)
    for b in blocks:
        p.free(b)
    assert assert_healthy(arena, p)["heap_objects"] == 0
    p.close()


@pytest.mark.parametrize("size", [64, 100_000])
def test_a_handle_from_before_a_release_never_matches_after_it(arena, size):
    """The generation map is given back with the pages it describes (it reads zero then), and a
    commit of released pages writes one non-zero generation over their entries: so the first
    handle an address ever had (generation 0) -- and any other from before the release, bar one
    value in 255 -- is refused after the pages were released and reused."""
    p = ProcessCache(arena)
    first = p.alloc(size)
    assert first.handle & layout.GEN_MASK == 0, "a fresh address hands out generation 0"
    p.free(first)
    p.flush()  # the span goes back to the page heap
    assert arena.scavenge() > 0  # and its pages, with their maps, to the OS
    blocks = [p.alloc(size) for _ in range(2 * arena.lay.heap_max // max(size, 8192) // 4)]
    again = next(b for b in blocks if b.handle >> layout.GEN_BITS == first.handle >> layout.GEN_BITS)
    assert again.handle != first.handle and again.handle & layout.GEN_MASK != 0
    refused_then_freed(arena, p, first, again, blocks)


# --- the maps' two parts (shm/layout.py) -------------------------------------------------------
def part(arena, h):
    """'coarse' or 'fine': the part of the maps handle h indexes."""
    return "coarse" if h >> layout.GEN_BITS >= arena.lay.handle_c0 else "fine"


def test_every_class_lands_in_its_part_of_the_maps(make_arena):
    """A block of every size class, and large ones: a coarse class's (object size a multiple of
    128) and a large block's handle index the coarse part, a fine class's the fine part; addr,
    view and free -- by the owner and by another P -- find the same bytes; the slow walk equals
    the fast figures."""
    from shm.sizeclasses import CLASS_TO_SIZE, SIZE_TO_CLASS

    arena = make_arena(heap_max=64 << 20, nslots=4)
    lay = arena.lay
    p, other = ProcessCache(arena), ProcessCache(arena)
    sizes = [CLASS_TO_SIZE[c] for c in range(1, layout.NCLASS)] + [32769, 100_000, 1 << 20]
    fine = [8, 16, 32, 48, 64, 80, 96, 112, 144, 160, 176, 192, 208, 224, 240, 288, 320, 352, 416, 448, 480]
    assert [s for s in sizes[:-3] if not layout.CLASS_COARSE[SIZE_TO_CLASS[(s + 7) >> 3]]] == fine + [
        576,
        704,
    ]
    blocks = [p.alloc(s) for s in sizes for _ in range(3)]
    for b in blocks:
        want = "coarse" if b.size > 32768 or b.size % 128 == 0 else "fine"
        assert part(arena, b.handle) == want, (b.size, b.handle)
        assert arena.addr(b.handle) == lay.heap_off + lay.handle_offset(b.handle)
        b.buf[:] = pattern(b.handle, b.size)
        start = arena.addr(b.handle)
        assert bytes(arena.mv[start : start + b.size]) == pattern(b.handle, b.size)
        assert bytes(other.view(b.handle, b.size)) == pattern(b.handle, b.size)
    assert len({lay.handle_offset(b.handle) for b in blocks}) == len(blocks)
    snap = assert_healthy(arena, p, other)  # check_all: fast == slow, every map byte accounted
    assert snap["heap_objects"] == len(blocks)
    for i, b in enumerate(blocks):
        assert bytes(b.buf) == pattern(b.handle, b.size)
        (p if i % 2 else other).free(b)  # the owner's local free, or another P's buffered one
    snap = assert_healthy(arena, p, other)
    assert snap["heap_objects"] == 0 and snap["frees"] == len(blocks) and snap["bad_frees"] == 0
    p.close()
    other.close()


def span_page(arena, h):
    return arena.lay.handle_page(h)


@pytest.mark.parametrize("old,new", [(128, 64), (64, 128), (64, 40_000)])
def test_a_stale_handle_of_the_other_part_is_refused(arena, old, new):
    """A span of one part given back to the heap and its pages reused by a span of the other
    (coarse 128 B blocks, fine 64 B ones, a large block): the old handles -- the stale one and
    the last one, freed -- free and view nothing, whichever P tries, and the arena is unchanged."""
    p, other = ProcessCache(arena), ProcessCache(arena)
    first = p.alloc(old)
    p.free(first)
    last = p.alloc(old)
    assert last.handle == layout.next_handle(first.handle)
    p.free(last)
    p.flush()  # the empty span goes back to the page heap
    page = span_page(arena, first.handle)
    assert arena.heap.span_of_page(page) < 0
    got = []
    while not any(span_page(arena, b.handle) == page for b in got):
        got.append(p.alloc(new))
    assert part(arena, got[-1].handle) != part(arena, first.handle)
    for b in got:
        b.buf[:] = pattern(b.handle, b.size)
    before = metadata_bytes(arena)
    for q in (p, other):
        for h in (first.handle, last.handle):
            for call in (q.free, q.view):
                with pytest.raises(BadHandle, match="stale") as err:
                    call(h)
                assert err.type is BadHandle
    assert metadata_bytes(arena) == before
    verify_and_free(p, got)
    assert assert_healthy(arena, p, other)["heap_objects"] == 0
    p.close()
    other.close()


@pytest.mark.parametrize("epoch", [True, False], ids=["as shipped", "epoch write disabled"])
def test_a_fine_handle_from_before_its_fine_map_page_was_given_back(arena, monkeypatch, epoch):
    """A fine block's first handle (generation 0), its span freed and its pages -- with the OS page
    of the fine map over them -- given back: when a fine span is placed there again, the fine-map
    page is reserved afresh (it reads 0) and the release epoch's generation written over it, so
    the old handle is refused.  Without that write the old handle would free the new block: the
    second case shows the write is what refuses it."""
    from shm.heap import PageHeap

    if not epoch:
        monkeypatch.setattr(PageHeap, "_regenerate_fine", lambda self, pages: None)
    p = ProcessCache(arena)
    first = p.alloc(64)
    assert part(arena, first.handle) == "fine" and first.handle & layout.GEN_MASK == 0
    p.free(first)
    p.flush()
    assert arena.scavenge() > 0
    assert arena.heap.hget("fine_map_pages") == 0, "the fine-map page went with the pages"
    assert arena.mv[arena.lay.finemap_flags + span_page(arena, first.handle) * 1024 // layout.OS_PAGE] == 0
    blocks = []
    while not blocks or blocks[-1].handle >> layout.GEN_BITS != first.handle >> layout.GEN_BITS:
        blocks.append(p.alloc(64))
    again = blocks[-1]
    assert arena.heap.hget("fine_map_pages") > 0
    if not epoch:
        assert again.handle == first.handle  # the fresh page read 0: the old handle matches
        p.free(first.handle)  # ... and frees the new block
        return
    assert again.handle != first.handle
    refused_then_freed(arena, p, first, again, blocks)
