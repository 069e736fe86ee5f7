"""Many real processes on one arena (no daemon): random sizes from 1 B to 1 MiB, a third of the
blocks freed by another process, every block verified before it is freed; then SIGKILL, outside
and inside critical sections."""

import multiprocessing as mp
import os
import queue
import signal

import mpworkers
import pytest
from support import kill_and_repair, pattern

from shm import ProcessCache, identities, stats

DEADLINE = 120  # seconds: only turns a hang into a failure
SPAWN = mp.get_context("spawn")
FORK = mp.get_context("fork")


def drain(q, main, expect=None):
    """Free what is left in a mailbox with the test's own P.  With `expect`, wait for exactly
    that many items (deadline-bounded); without, take what is there."""
    n = 0
    while expect is None or n < expect:
        try:
            h, size = q.get(timeout=DEADLINE if expect is not None else 0.5)
        except queue.Empty:
            if expect is not None:
                raise AssertionError(f"mailbox: got {n} handles, expected {expect}") from None
            break
        assert bytes(main.view(h, size)) == pattern(h, size)
        main.free(h)
        n += 1
    return n


def start_workers(ctx, arena, n, n_ops, seed, extra=None):
    boxes = [ctx.Queue() for _ in range(n)]
    results = ctx.Queue()
    procs = []
    for i in range(n):
        p = ctx.Process(
            target=mpworkers.arena_worker,
            args=(arena.name, i, n_ops, seed + i, boxes[i], boxes[(i + 1) % n], results)
            + tuple((extra or {}).get(i, ())),
        )
        p.start()
        procs.append(p)
    return procs, boxes, results


def join_all(procs):
    for p in procs:
        p.join(DEADLINE)
        assert not p.is_alive(), f"worker {p.pid} hung"


def final_checks(arena, main):
    snap = arena.update_stats(stopped=[main.slot])
    assert identities(snap) == []
    assert arena.check_all() == []
    assert stats.diff(snap, stats.read_stats_slow(arena)) == []
    return snap


@pytest.mark.parametrize("ctx", [SPAWN, FORK], ids=["spawn", "fork"])
def test_four_processes_random_sizes_cross_frees(make_arena, ctx):
    arena = make_arena(heap_max=256 << 20, nslots=8)
    main = ProcessCache(arena)
    procs, boxes, results = start_workers(ctx, arena, 4, 3000, seed=100)
    res = [results.get(timeout=DEADLINE) for _ in procs]
    join_all(procs)
    assert all(p.exitcode == 0 for p in procs)
    sent = {r["idx"]: r["sent"] for r in res}
    received = {r["idx"]: r["received"] for r in res}
    drained = 0
    for i, box in enumerate(boxes):
        # Worker i sends to worker i+1; what i+1 did not take is still in its mailbox.
        drained += drain(box, main, expect=sent[(i - 1) % 4] - received[i])
    snap = final_checks(arena, main)
    mallocs = sum(r["mallocs"] for r in res)
    frees = sum(r["frees"] for r in res) + drained
    assert snap["mallocs"] == mallocs and snap["frees"] == frees == mallocs
    assert snap["heap_objects"] == 0
    # Spans emptied by cross-process frees wait on their partial lists until the daemon's tick.
    arena.free_empty_spans()
    snap = final_checks(arena, main)
    assert snap["heap_objects"] == 0 and snap["heap_inuse"] == 0
    assert sum(received.values()) > 0, "no block crossed processes"
    assert snap["large_mallocs"] > 0 and sum(e["mallocs"] for e in snap["by_size"]) > 0
    assert arena.registry.active_slots() == [main.slot]
    main.close()


@pytest.mark.slow
def test_sigkill_mid_run_survivors_finish_and_cache_is_reclaimed(make_arena):
    arena = make_arena(heap_max=256 << 20, nslots=8)
    main = ProcessCache(arena)
    progress = SPAWN.Event()
    procs, boxes, results = start_workers(SPAWN, arena, 4, 1500, seed=200, extra={3: (progress, 700)})
    assert progress.wait(DEADLINE), "victim made no progress"
    victim = procs[3]
    victim_slot = next(k for k in arena.registry.active_slots() if arena.registry.pid(k) == victim.pid)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    assert victim.exitcode == -signal.SIGKILL
    res = [results.get(timeout=DEADLINE) for _ in procs[:3]]
    join_all(procs[:3])
    assert sorted(r["idx"] for r in res) == [0, 1, 2]
    assert all(p.exitcode == 0 for p in procs[:3])
    for box in boxes:
        drain(box, main)
    # The victim's slot is dead: update_stats reclaims it (rolls back any half-done operation,
    # flushes its cache) before reading anything.
    assert not arena.registry.alive(victim_slot)
    final_checks(arena, main)
    assert arena.registry.active_slots() == [main.slot]
    # Its blocks stay allocated (other processes might hold their handles); the heap works on.
    more = [main.alloc(s) for s in (10, 1000, 100_000)]
    for b in more:
        main.free(b)
    final_checks(arena, main)
    main.close()


@pytest.mark.parametrize("where", ["heap", "central", "release", "fine"])
def test_sigkill_inside_a_critical_section_is_rolled_back(make_arena, where):
    """The victim dies holding a lock, its undo log half full.  The next process to take that
    lock finds it dirty, rolls the dead operation back, and goes on; check() passes."""
    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    keep = [main.alloc(64) for _ in range(3)] + [main.alloc(50_000)]
    ready = SPAWN.Event()
    victim = SPAWN.Process(target=mpworkers.stuck_in_critical_section, args=(arena.name, where, ready))
    victim.start()
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    from shm import layout as L

    fine_pages = arena.heap.hget("fine_map_pages")
    dirty = [lid for lid in range(L.NLOCKS) if arena.q[arena.lay.lock_word(lid)]]
    assert dirty, "the victim should hold a dirty lock"
    # Take the same lock the victim died in: a large alloc needs the heap lock, a fresh 64 B
    # refill of another P needs central[64 B].
    b = kill_and_repair(
        arena, victim, lambda: ProcessCache(arena).alloc(64) if where == "central" else main.alloc(100_000)
    )
    assert all(arena.q[arena.lay.lock_word(lid)] == 0 for lid in dirty)
    if where == "fine":  # the flags it set are cleared again; blocks of the class work
        assert arena.heap.hget("fine_map_pages") < fine_pages
        assert arena.check_all(parts=("heap",)) == []
    if where in ("release", "fine"):  # the span stays marked released, and is committed again for reuse
        assert arena.read_stats_slow()["heap_released"] > 0
        blocks = [main.alloc(100_000) for _ in range(20)] + [main.alloc(160) for _ in range(200)]
        for x in blocks:
            x.buf[:] = pattern(x.handle, x.size)
        for x in blocks:
            assert bytes(x.buf) == pattern(x.handle, x.size)
            main.free(x)
    if where != "central":
        main.free(b)
    else:
        b[3].free(b)
        b[3].close()
    for x in keep:
        main.free(x)
    snap = final_checks(arena, main)
    assert snap["heap_objects"] == 0
    assert arena.registry.active_slots() == [main.slot]
    main.close()
