"""The statistics (shm/stats.py) in one process: the seed bug (reading before flushing), counters
that never decrease."""

from support import assert_healthy, settle
from shm import (ProcessCache, identities, read_stats, read_stats_slow)
from shm import stats as S


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
    arena.flush_all(parked=[p.slot, other.slot])
    truth = read_stats_slow(arena)
    wrong = S.diff(stale, truth)
    assert wrong, "reading before the flush should have disagreed with the arena"
    assert stale["heap_inuse"] != truth["heap_inuse"]
    assert stale["frees"] != truth["frees"]
    # Mixing figures read before the flush with figures read after breaks the identities,
    # exactly as Sys != HeapSys + ... did in the Go bug.
    mixed = dict(read_stats(arena), heap_inuse=stale["heap_inuse"], heap_idle=stale["heap_idle"],
                 heap_alloc=stale["heap_alloc"])
    assert identities(mixed), "the mixed snapshot should break an identity"

    # The fixed order: flush first, then read.
    more = [p.alloc(64) for _ in range(7)]
    for b in more:
        p.free(b)
    right = arena.update_stats(parked=[p.slot, other.slot])
    assert identities(right) == []
    assert S.diff(right, read_stats_slow(arena)) == []
    assert right["heap_objects"] == len(keep) + len(other_blocks)
    for b in keep:
        p.free(b)
    for b in other_blocks:
        other.free(b)
    assert_healthy(arena, p, other)
    p.close()
    other.close()


def test_counters_never_decrease_even_with_cached_frees(arena):
    p, q = ProcessCache(arena), ProcessCache(arena)
    prev = settle(arena, p, q)
    import random
    rnd = random.Random(7)
    live = []
    for step in range(30):
        for _ in range(rnd.randint(0, 200)):
            live.append((p if rnd.random() < 0.5 else q).alloc(rnd.choice([8, 64, 500, 3000, 40_000])))
        rnd.shuffle(live)
        for _ in range(rnd.randint(0, len(live))):
            (p if rnd.random() < 0.5 else q).free(live.pop())
        cur = settle(arena, p, q)
        assert S.monotonic(prev, cur) == []
        assert identities(cur) == []
        assert cur["heap_objects"] == len(live)
        prev = cur
    assert S.check(arena) == []
    p.close()
    q.close()
