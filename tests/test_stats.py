"""The statistics (shm/stats.py) in one process: counters that never decrease, identities that
hold, whatever the caches hold."""

import threading

from support import DEADLINE, settle

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


def test_a_p_claimed_while_the_figures_are_compared_counts_in_both_or_neither(arena, monkeypatch):
    """The daemon's slow snapshot reads the fast figures, then walks the spans.  A worker that
    claimed its slot in between counted in the walk and not in the figures (mcache_sys):
    read_compared holds the registry lock across both reads, so such a claim waits for it."""
    first = ProcessCache(arena)
    real_slow, threads, late = stats.read_stats_slow, [], []

    def slow_after_a_claim(a, *args, **kw):
        t = threading.Thread(target=lambda: late.append(ProcessCache(arena)))
        t.start()
        threads.append(t)
        t.join(1.0)  # unlocked, the claim lands now; locked, it waits for the release
        return real_slow(a, *args, **kw)

    monkeypatch.setattr(stats, "read_stats_slow", slow_after_a_claim)
    snap, d = stats.read_compared(arena)
    assert d == []
    assert snap["mcache_inuse"] == arena.lay.slot_words * 8  # `first` only: the claim waited
    threads[0].join(DEADLINE)
    assert len(late) == 1
    late[0].close()
    first.close()
