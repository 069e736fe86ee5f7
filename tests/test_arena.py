"""The arena (shm/arena.py) in one process: its layout check on attach, its structure check,
its P slots."""

import pytest
from shm import (CorruptionError, LayoutMismatch, ProcessCache, layout)


def test_layout_mismatch_refused(arena):
    from shm import Arena
    arena.q[layout.HDR["version"]] = 99
    with pytest.raises(LayoutMismatch, match="version"):
        Arena.attach(arena.name)
    arena.q[layout.HDR["version"]] = layout.VERSION
    w = arena.lay.spans_off // 8
    arena.q[w] ^= 1
    with pytest.raises(LayoutMismatch, match="spans"):
        Arena.attach(arena.name)
    arena.q[w] ^= 1
    other = Arena.attach(arena.name)
    other.close()


def test_check_names_corruption(arena):
    p = ProcessCache(arena)
    b = p.alloc(64)
    p.flush()
    off = arena.lay.amap_off + (b.handle - arena.lay.heap_off) // 8
    arena.mv[off + 1] = layout.ALLOC  # a byte outside any object start
    with pytest.raises(CorruptionError, match="allocation map"):
        arena.check()
    arena.mv[off + 1] = 0
    arena.check()
    p.free(b)
    p.close()


def test_slots_are_reused_and_exhausted_cleanly(make_arena):
    from shm import NoFreeSlot
    arena = make_arena(nslots=2)
    a, b = ProcessCache(arena), ProcessCache(arena)
    with pytest.raises(NoFreeSlot):
        ProcessCache(arena)
    a.close()
    c = ProcessCache(arena)
    assert c.slot == a.slot
    b.close()
    c.close()
    assert arena.active_slots() == []
