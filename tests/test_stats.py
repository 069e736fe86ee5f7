"""The statistics (shm/stats.py) in one process: counters that never decrease, identities that
hold, whatever the caches hold."""

from support import settle

from shm import ProcessCache, identities, stats


def test_counters_never_decrease_even_with_cached_frees(arena):
    p, q = ProcessCache(arena), ProcessCache(arena)
    prev = settle(arena, p, q)
    import random

    rnd = random.Random(7)
    live = []
    for _ in range(30):
        for _ in range(rnd.randint(0, 200)):
            live.append((p if rnd.random() < 0.5 else q).alloc(rnd.choice([8, 64, 500, 3000, 40_000])))
        rnd.shuffle(live)
        for _ in range(rnd.randint(0, len(live))):
            (p if rnd.random() < 0.5 else q).free(live.pop())
        cur = settle(arena, p, q)
        assert stats.monotonic(prev, cur) == []
        assert identities(cur) == []
        assert cur["heap_objects"] == len(live)
        prev = cur
    assert arena.check_all() == []
    p.close()
    q.close()
