"""A worker with a live forked child, SIGKILLed inside a critical section, against the real daemon.

The child inherited the worker's descriptors of the segment and its mapping.  With Python's fork
(os.fork, a fork-based multiprocessing.Pool) the arena gives the child descriptions of its own
(shm/arena.py), so the kernel drops the dead worker's lock at once: the daemon and every other
worker go on, the dead operation is rolled back.  A fork that runs no Python hook (C code calling
fork()) leaves the lock held by the child: the daemon reports it stranded, and nobody hangs."""

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import time

import mpworkers
import pytest
from support import DEADLINE, pattern

import client
from shm import Arena, stats
from shm import layout as L
from shm.sizeclasses import SIZE_TO_CLASS

SPAWN = mp.get_context("spawn")
ANSWER_S = 5  # only turns a hang into a failure; the observed times go into the message


def _ping_s(endpoint):
    t = time.monotonic()
    try:
        client.ping(endpoint, int(ANSWER_S * 1000))
    except client.DaemonUnavailable:
        return None
    return round(time.monotonic() - t, 3)


def _ask(cmds, res, cmd):
    """One command to a connected_worker: (reply or None when none came in ANSWER_S, seconds)."""
    t = time.monotonic()
    cmds.put(cmd)
    try:
        reply = res.get(timeout=ANSWER_S)
    except queue.Empty:
        reply = None
    return reply, round(time.monotonic() - t, 3)


def _reap(proc):
    """Wait for `proc` to die by its pid: join() would wait for its sentinel pipe, whose write end
    the victim's child inherited and keeps open."""
    deadline = time.monotonic() + DEADLINE
    while proc.exitcode is None:
        assert time.monotonic() < deadline, f"process {proc.pid} did not die"
        time.sleep(0.01)
    return proc.exitcode


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@contextlib.contextmanager
def _victim_inside(d, where, how):
    """Another connected worker (with blocks of its own), then the victim stopped inside the lock
    with its child alive, then SIGKILLed there.  Yields (cmds, res, other, victim pid, child pid,
    blocks); kills whatever is left at the end."""
    cmds, res = SPAWN.Queue(), SPAWN.Queue()
    other = SPAWN.Process(target=mpworkers.connected_worker, args=(d.endpoint, cmds, res))
    other.start()
    ready, out = SPAWN.Event(), SPAWN.Queue()
    victim = SPAWN.Process(target=mpworkers.forking_victim, args=(d.endpoint, where, how, ready, out))
    child = None
    try:
        assert res.get(timeout=DEADLINE)[0] == "slot"
        blocks = []
        for size in (48, 1000, 50_000):  # not 64 B: its next 64 B alloc must refill from central
            reply, _ = _ask(cmds, res, ("alloc", size))
            assert reply is not None and reply[0] == "ok", reply
            blocks.append((reply[1], size))
        victim.start()
        child, _slot = out.get(timeout=DEADLINE)
        assert ready.wait(DEADLINE), "the victim never reached its critical section"
        os.kill(victim.pid, signal.SIGKILL)
        assert _reap(victim) == -signal.SIGKILL
        yield cmds, res, other, victim.pid, child, blocks
    finally:
        if victim.pid is not None:
            _kill(victim.pid)
            _reap(victim)
        if child is not None:
            _kill(child)
        other.kill()
        other.join(DEADLINE)


def _finish(d, cmds, res, other, blocks):
    """Every block still holds its pattern; the other worker frees them all and leaves; check
    passes on an arena that holds nothing (the dead P reclaimed, its operation rolled back)."""
    arena = Arena.attach(d.name)
    try:
        bad = [h for h, n in blocks if bytes(arena.mv[arena.addr(h) : arena.addr(h) + n]) != pattern(h, n)]
    finally:
        arena.close()
    assert bad == [], f"blocks whose pattern changed: {bad}"
    for h, _ in blocks:
        assert _ask(cmds, res, ("free", h))[0] == ("ok", None)
    assert _ask(cmds, res, ("close",))[0] == ("ok", None)
    other.join(DEADLINE)
    assert other.exitcode == 0
    checked = client.check(d.endpoint)
    assert checked["problems"] == []
    assert checked["snapshot"]["num_p"] == 0 and checked["snapshot"]["heap_objects"] == 0


@pytest.mark.parametrize("where", ["heap", "central"])
def test_fork_then_crash_inside_a_lock_frees_the_lock(start_daemon, where):
    """The worker forks (Python's fork), stops inside the lock, is SIGKILLed; its child lives on.
    Throughout, the daemon answers ping and another worker's alloc that needs the same lock
    completes; afterwards the snapshot is consistent and check passes."""
    d = start_daemon()
    with _victim_inside(d, where, "python") as (cmds, res, other, _victim, child, blocks):
        pings, allocs = [], []
        size = 100_000 if where == "heap" else 64  # needs the very lock the victim died in
        for _ in range(3):
            pings.append(_ping_s(d.endpoint))
            reply, took = _ask(cmds, res, ("alloc", size))
            allocs.append(took if reply is not None and reply[0] == "ok" else (reply, took))
            if reply is not None and reply[0] == "ok":
                blocks.append((reply[1], size))
            pings.append(_ping_s(d.endpoint))
        seen = f"ping seconds {pings}, alloc seconds {allocs} (child {child} alive)"
        assert None not in pings, f"the daemon stopped answering: {seen}"
        assert all(isinstance(a, float) for a in allocs), f"another worker's alloc hung or failed: {seen}"
        snap = client.stats(d.endpoint, slow=True)
        assert snap["consistent"], (snap["unflushed"], snap["stuck_locks"])
        assert stats.identities(snap) == [] and snap["slow_equal"], snap["slow_diff"]
        assert snap["stuck_locks"] == []
        os.kill(child, 0)  # all of it with the child alive
        _finish(d, cmds, res, other, blocks)


def _wait_consistent(endpoint):
    """Stats until a consistent snapshot (the daemon retries a deferred reclaim every second)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        snap = client.stats(endpoint, slow=True)
        if snap["consistent"]:
            return snap
        assert time.monotonic() < deadline, f"never consistent: {snap['unflushed']} {snap['stuck_locks']}"
        time.sleep(0.2)


@pytest.mark.parametrize("where", ["heap", "central"])
def test_a_lock_kept_by_a_fork_without_python_hooks_is_reported_not_waited_for(start_daemon, where):
    """The worker forks from C (no Python hook runs: the child keeps the parent's description and
    with it the lock), stops inside the lock, is SIGKILLed.  The lock is stranded: the daemon keeps
    answering, says so in its log and in every snapshot (consistent: false), and another worker's
    alloc that needs the lock fails with LockUnavailable instead of hanging.  Once the child exits
    the kernel drops the lock, the daemon rolls the dead operation back, and all is well."""
    d = start_daemon()
    with _victim_inside(d, where, "c") as (cmds, res, other, victim, child, blocks):
        lock = L.lock_name(L.LOCK_HEAP if where == "heap" else L.LOCK_CENTRAL(SIZE_TO_CLASS[64 >> 3]))
        size = 100_000 if where == "heap" else 64
        pings, allocs = [], []
        for _ in range(2):
            pings.append(_ping_s(d.endpoint))
            allocs.append(_ask(cmds, res, ("alloc", size)))
            pings.append(_ping_s(d.endpoint))
        seen = f"ping seconds {pings}, allocs {allocs}"
        assert None not in pings, f"the daemon stopped answering: {seen}"
        for reply, _took in allocs:
            assert reply is not None, f"another worker's alloc hung: {seen}"
            assert (
                reply[0] == "error" and reply[1].startswith("LockUnavailable") and "stranded" in reply[1]
            ), seen
        snap = client.stats(d.endpoint)
        assert not snap["consistent"]
        assert {"lock": lock, "holder_pid": victim, "stranded": True} in snap["stuck_locks"]
        problems = client.check(d.endpoint)["problems"]
        assert any(f"lock {lock} is stranded" in p for p in problems), problems
        assert f"lock stranded  lock={lock}" in d.log()
        _kill(child)
        snap = _wait_consistent(d.endpoint)
        assert snap["stuck_locks"] == [] and stats.identities(snap) == [] and snap["slow_equal"]
        reply, _ = _ask(cmds, res, ("alloc", size))
        assert reply is not None and reply[0] == "ok", reply
        blocks.append((reply[1], size))
        _finish(d, cmds, res, other, blocks)
