"""The arena (shm/arena.py) in one process: its layout check on attach, its structure check,
its P slots, and its snapshot order (flush first, then read: the seed bug)."""

import pytest
from support import assert_healthy

from shm import (
    CorruptionError,
    LayoutMismatch,
    ProcessCache,
    identities,
    layout,
    read_stats,
    read_stats_slow,
    stats,
)


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


def test_the_header_names_every_region_and_an_attacher_checks_it(arena):
    """Every region offset and size the layout computes is a header word written at creation,
    and one that disagrees with the layout is refused by an attacher."""
    from shm import Arena

    derived = [k for k in vars(arena.lay) if k.endswith(("_off", "_bytes")) and k in layout.HDR]
    assert set(derived) <= set(layout.DERIVED), "a region in the header that nobody writes"
    for k in layout.DERIVED:
        assert arena.q[layout.HDR[k]] == getattr(arena.lay, k) != 0, k
    for k in ("gmap_off", "amap_off"):
        arena.q[layout.HDR[k]] += 8
        with pytest.raises(LayoutMismatch, match=k):
            Arena.attach(arena.name)
        arena.q[layout.HDR[k]] -= 8
    Arena.attach(arena.name).close()


def test_check_names_corruption(arena):
    p = ProcessCache(arena)
    b = p.alloc(64)
    p.flush()
    off = arena.lay.amap_byte(b.handle)
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
    assert arena.registry.active_slots() == []


def test_seed_bug_reading_before_flushing_is_wrong(arena):
    """golang/go#38712: figures read before the caches are flushed disagree with the arena.
    Built on purpose: a P caches spans whose objects are all freed, so flushing returns them
    to the heap and changes heap_inuse, heap_idle, mspan_inuse, mallocs and frees."""
    p, other = ProcessCache(arena), ProcessCache(arena)
    keep = [p.alloc(4096) for _ in range(3)]
    gone = [p.alloc(64) for _ in range(100)] + [p.alloc(1000) for _ in range(5)]
    for b in gone:
        p.free(b)
    other_blocks = [other.alloc(64) for _ in range(10)]

    # The old order: read first, flush after -- as updatememstats did before 0ddde4ada2b1.
    stale = read_stats(arena)
    arena.flush_all(stopped=[p.slot, other.slot])
    truth = read_stats_slow(arena)
    wrong = stats.diff(stale, truth)
    assert wrong, "reading before the flush should have disagreed with the arena"
    assert stale["heap_inuse"] != truth["heap_inuse"]
    assert stale["frees"] != truth["frees"]
    # Mixing figures read before the flush with figures read after breaks the identities,
    # exactly as Sys != HeapSys + ... did in the Go bug.
    mixed = dict(
        read_stats(arena),
        heap_inuse=stale["heap_inuse"],
        heap_idle=stale["heap_idle"],
        heap_alloc=stale["heap_alloc"],
    )
    assert identities(mixed), "the mixed snapshot should break an identity"

    # The fixed order: flush first, then read.
    more = [p.alloc(64) for _ in range(7)]
    for b in more:
        p.free(b)
    right = arena.update_stats(stopped=[p.slot, other.slot])
    assert identities(right) == []
    assert stats.diff(right, read_stats_slow(arena)) == []
    assert right["heap_objects"] == len(keep) + len(other_blocks)
    for b in keep:
        p.free(b)
    for b in other_blocks:
        other.free(b)
    assert_healthy(arena, p, other)
    p.close()
    other.close()


def test_check_names_a_free_slot_that_still_holds_work(arena):
    """Registry.check, run by check_all: a slot given back must be idle."""
    from shm import layout

    for p in [ProcessCache(arena) for _ in range(4)]:
        p.close()  # slots 0..3 claimed, then given back
    sw = arena.lay.slot_word(3)
    assert arena.registry.state(3) == layout.SLOT_FREE and arena.check_all() == []
    arena.q[sw + layout.SLOT["rfree_n"]] = 1
    assert arena.check_all(parts=["registry"]) == [
        "slot 3 is FREE but still caches spans or holds buffered work"
    ]
    arena.q[sw + layout.SLOT["rfree_n"]] = 0
