"""Stopping the daemon under live workers never splits the world: by default the arena is kept for
them and a restarted daemon adopts it; a forced stop closes it for good (every worker's next call
raises ArenaClosed); a handle of one arena never resolves in another.  The real daemon and real
worker processes, every block filled with its pattern and verified."""

import os
import pickle
import re
import signal
import time

import mpworkers
import pytest
from support import DEADLINE, assert_healthy, pattern
from test_daemon import SPAWN, finish_workers, run_cli, start_workers

import client
from shm import Arena, ProcessCache, layout, stats, world
from shm.arena import unlink_segment

SIZES = (64, 64, 5000, 100_000)  # fast path, fast path, another class, a large block


def ask(cmds, res, *cmd):
    cmds.put(cmd)
    return res.get(timeout=DEADLINE)


def connected(d):
    """A spawned worker driven through queues (mpworkers.connected_worker)."""
    cmds, res = SPAWN.Queue(), SPAWN.Queue()
    w = SPAWN.Process(target=mpworkers.connected_worker, args=(d.endpoint, cmds, res))
    w.start()
    assert res.get(timeout=DEADLINE)[0] == "slot"
    return w, cmds, res


def alloc_all(cmds, res, sizes=SIZES):
    """{handle: size} of blocks the worker allocated and filled with their pattern."""
    out = {}
    for size in sizes:
        kind, h = ask(cmds, res, "alloc", size)
        assert kind == "ok", h
        out[h] = size
    return out


def close_worker(w, cmds, res):
    assert ask(cmds, res, "close") == ("ok", None)
    w.join(DEADLINE)
    assert w.exitcode == 0


def consistent_snapshot(endpoint):
    """The new daemon's first consistent snapshot: a worker of the cooperative protocol is
    reached once its control thread re-binds with its next heartbeat."""
    deadline = time.monotonic() + DEADLINE
    while True:
        snap = client.stats(endpoint, deadline_ms=500, slow=True)
        if snap["consistent"]:
            return snap
        assert time.monotonic() < deadline, f"workers never re-registered: {snap['unflushed']}"


@pytest.mark.parametrize("protocol", ["membarrier", "cooperative"])
def test_sigterm_with_live_workers_keeps_the_arena_and_a_restarted_daemon_adopts_it(
    start_daemon, monkeypatch, protocol
):
    if protocol == "cooperative":  # the daemon and the workers inherit it
        monkeypatch.setenv("SHMALLOC_NO_MEMBARRIER", "1")
    elif not world.membarrier_supported():
        pytest.skip("membarrier(2) is not available here")
    d = start_daemon()
    procs, boxes, results, until = start_workers(d, 2)  # allocating and freeing throughout
    w, cmds, res = connected(d)
    kept = alloc_all(cmds, res)
    before = client.stats(d.endpoint, slow=True)
    assert before["consistent"] and before["num_p"] == 3

    assert d.stop(signal.SIGTERM) == 0
    assert not os.path.exists(d.sock_path()), "socket file left after SIGTERM"
    assert os.path.exists(f"/dev/shm/{d.name}"), "the arena was removed under live workers"
    log = d.log()
    assert "final snapshot" in log and "kept the arena for 3 live workers" in log, log
    assert "a daemon restarted on" in log and "stopped" in log

    # No daemon: the workers go on in the one arena, slow paths included.
    kept.update(alloc_all(cmds, res, (64, 200_000)))
    first = next(iter(kept))
    assert ask(cmds, res, "free", first) == ("ok", None)
    del kept[first]

    d2 = start_daemon(endpoint=d.endpoint, name=d.name)
    log2 = d2.log()
    assert "adopted arena" in log2 and "stopped, kept for its live workers" in log2, log2
    if protocol == "cooperative":  # its STOP messages can reach the idle worker once re-bound
        deadline = time.monotonic() + DEADLINE
        while d2.log().count("P re-registered") < 3:  # with the next heartbeat of each
            assert time.monotonic() < deadline, d2.log()
            time.sleep(0.05)
    snap = consistent_snapshot(d2.endpoint)
    assert snap["num_p"] == 3 and snap["slow_equal"] and stats.identities(snap) == []
    assert stats.monotonic(before, snap) == [], "counters went back across the restart"
    assert snap["mallocs"] > before["mallocs"]
    for h, size in kept.items():  # allocated before and after the restart: every one intact
        assert ask(cmds, res, "verify", h, size) == ("ok", None)
    # The heartbeat and the stop handshake carry on with the new daemon: a snapshot parks all 3.
    again = client.stats(d2.endpoint, slow=True)
    assert again["consistent"] and again["num_p"] == 3 and again["epoch"] > snap["epoch"]
    assert again["stop_protocol"] == protocol

    for h in kept:
        assert ask(cmds, res, "free", h) == ("ok", None)
    close_worker(w, cmds, res)
    out = finish_workers(d2, procs, boxes, results, until)
    assert all(r["mallocs"] > 0 for r in out)
    final = client.stats(d2.endpoint, slow=True)
    assert final["consistent"] and final["slow_equal"] and final["heap_objects"] == 0
    assert stats.identities(final) == [] and final["num_p"] == 0
    r = run_cli("check", "--endpoint", d2.endpoint)
    assert r.returncode == 0 and "check: OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("how", ["SIGINT", "shutdown op"])
def test_other_stops_keep_the_arena_for_a_live_worker(start_daemon, how):
    d = start_daemon()
    w, cmds, res = connected(d)
    kept = alloc_all(cmds, res, (64, 100_000))
    if how == "SIGINT":
        assert d.stop(signal.SIGINT) == 0
    else:
        assert client.request(d.endpoint, "shutdown")["ok"]
        assert d.proc.wait(DEADLINE) == 0
    assert os.path.exists(f"/dev/shm/{d.name}") and "kept the arena for 1 live workers" in d.log()
    d2 = start_daemon(endpoint=d.endpoint, name=d.name)
    assert "adopted arena" in d2.log()
    for h, size in kept.items():
        assert ask(cmds, res, "verify", h, size) == ("ok", None)
        assert ask(cmds, res, "free", h) == ("ok", None)
    close_worker(w, cmds, res)
    snap = consistent_snapshot(d2.endpoint)
    assert snap["heap_objects"] == 0 and snap["slow_equal"]


def test_stop_with_no_live_worker_removes_the_arena(start_daemon):
    """A worker that closed, and one that died, hold no P: nothing is kept for them."""
    d = start_daemon()
    w, cmds, res = connected(d)
    alloc_all(cmds, res, (64,))
    close_worker(w, cmds, res)
    w2, cmds2, res2 = connected(d)
    os.kill(w2.pid, signal.SIGKILL)
    w2.join(DEADLINE)
    assert d.stop() == 0
    assert not os.path.exists(f"/dev/shm/{d.name}") and "kept the arena" not in d.log()


def test_forced_shutdown_closes_the_arena_and_no_old_handle_resolves_in_the_new_one(start_daemon):
    np = pytest.importorskip("numpy")
    d = start_daemon()
    old = client.heap(d.endpoint)  # first, so that a fresh arena hands out the same handles
    old_blocks = [old.alloc(s) for s in SIZES]
    for b in old_blocks:
        b.buf[:] = pattern(b.handle, b.size)
    old.free(old.alloc(64))  # a free object on the P's local list: the next alloc is a fast one
    arr = old.ndarray((32,), "int64")
    arr[:] = np.arange(32)
    refs = [pickle.dumps(b) for b in old_blocks] + [pickle.dumps(arr), pickle.dumps(arr[4:8])]
    old_id = old.arena.arena_id
    w, cmds, res = connected(d)
    theirs = alloc_all(cmds, res)

    r = run_cli("shutdown", "--endpoint", d.endpoint, "--force")  # the op with force: true
    assert r.returncode == 0 and "closed for good" in r.stdout, r.stdout + r.stderr
    assert d.proc.wait(DEADLINE) == 0
    assert not os.path.exists(f"/dev/shm/{d.name}") and not os.path.exists(d.sock_path())
    assert "closed the arena for good: 2 workers told" in d.log(), d.log()

    # Every worker's next call raises ArenaClosed, saying the daemon closed the arena.
    for cmd in (("alloc", 64), ("free", next(iter(theirs))), ("verify", *next(iter(theirs.items())))):
        kind, msg = ask(cmds, res, *cmd)
        assert kind == "error" and msg.startswith("ArenaClosed") and "closed for good by its daemon" in msg
    for call in (
        lambda: old.alloc(64),  # the fast path: a free object is listed for this size
        lambda: old.alloc(1 << 20),
        lambda: old.free(old_blocks[0]),
        lambda: old.view(old_blocks[1]),
        lambda: old_blocks[2].buf,
    ):
        with pytest.raises(client.ArenaClosed, match="closed for good by its daemon"):
            call()

    d2 = start_daemon(endpoint=d.endpoint, name=d.name)
    assert "adopted arena" not in d2.log() and "adopted=False" in d2.log()
    new = client.heap(d2.endpoint)  # the default heap: references load through it
    try:
        assert new is not old and old._closed, "the default heap of a closed arena was not replaced"
        assert new.arena.arena_id != old_id
        fresh = [new.alloc(s) for s in SIZES]
        for b in fresh:
            b.buf[:] = pattern(b.handle, b.size)
        # The same handles live in the new arena: resolving an old one would reach them.
        assert [b.handle for b in fresh] == [b.handle for b in old_blocks]
        objects = client.stats(d2.endpoint)["heap_objects"]
        for b in old_blocks:
            with pytest.raises(client.ForeignReference, match="not to this heap's arena"):
                new.free(b)
            with pytest.raises(client.ForeignReference):
                new.view(b)
        with pytest.raises(client.ForeignReference):
            new.free(arr)
        for ref in refs:
            with pytest.raises(client.ForeignReference, match="names arena"):
                pickle.loads(ref)
        for b in fresh:  # untouched by the refused calls
            assert bytes(b.buf) == pattern(b.handle, b.size)
        assert client.stats(d2.endpoint)["heap_objects"] == objects
        for b in fresh:
            new.free(b)
    finally:
        client.close_heap()
    close_worker(w, cmds, res)
    r = run_cli("check", "--endpoint", d2.endpoint)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cleanup_keeps_an_arena_live_workers_hold_unless_forced(start_daemon):
    d = start_daemon()
    w, cmds, res = connected(d)
    kept = alloc_all(cmds, res, (64,))
    assert d.stop() == 0 and os.path.exists(f"/dev/shm/{d.name}")
    r = run_cli("cleanup", "--endpoint", d.endpoint, "--name", d.name)
    assert r.returncode == 1 and "1 live worker" in r.stderr and "--force" in r.stderr, r.stderr
    assert os.path.exists(f"/dev/shm/{d.name}")
    h, size = next(iter(kept.items()))
    assert ask(cmds, res, "verify", h, size) == ("ok", None)
    r = run_cli("cleanup", "--endpoint", d.endpoint, "--name", d.name, "--force")
    assert r.returncode == 0 and f"/dev/shm/{d.name}" in r.stdout, r.stdout + r.stderr
    assert not os.path.exists(f"/dev/shm/{d.name}")
    kind, msg = ask(cmds, res, "alloc", 64)
    assert kind == "error" and "ArenaClosed" in msg and "shmalloc cleanup --force" in msg, msg
    close_worker(w, cmds, res)


def test_a_worker_whose_daemon_was_replaced_by_a_fresh_arena_is_told(start_daemon):
    """The daemon killed, its arena removed by hand, a new daemon on the endpoint: the worker's
    heartbeat names its arena, the new daemon says it serves another, the worker's next call
    raises ArenaClosed -- its handles never reach the new arena."""
    d = start_daemon()
    w, cmds, res = connected(d)
    alloc_all(cmds, res, (64,))
    d.stop(signal.SIGKILL)
    unlink_segment(d.name)
    d2 = start_daemon(endpoint=d.endpoint, name=d.name)
    deadline = time.monotonic() + DEADLINE
    while True:  # told by the reply to its next heartbeat (one a second)
        kind, msg = ask(cmds, res, "alloc", 64)
        if kind == "error":
            break
        assert time.monotonic() < deadline, "the worker never learnt its arena was gone"
        time.sleep(0.05)
    assert msg.startswith("ArenaClosed") and "served by a daemon of another arena" in msg, msg
    close_worker(w, cmds, res)
    assert client.stats(d2.endpoint)["num_p"] == 0


# --- closing for good, on an arena without a daemon (shm/world.py close_for_good) ---------------
def test_closing_for_good_stops_every_call_of_every_p_and_refuses_new_ones(arena):

    p, other = ProcessCache(arena), ProcessCache(arena)
    b = p.alloc(64)
    p.free(p.alloc(64))  # listed again: the next alloc(64) is a fast one
    p.free(p.alloc(100_000))  # kept in the P's large cache: so is the next alloc(100_000)
    theirs = other.alloc(64)
    active = arena.registry.active_slots()
    told = world.close_for_good(arena, layout.CLOSED_FORCED)
    assert sorted(told) == sorted([p.slot, other.slot]) == active
    for k in told:
        assert arena.q[arena.lay.slot_word(k) + layout.SLOT["stop"]] == layout.STOP_CLOSED
    why = f"closed for good by its daemon (pid {os.getpid()}, a forced shutdown)"
    for call in (
        lambda: p.alloc(64),
        lambda: p.alloc(100_000),
        lambda: p.alloc(5000),
        lambda: p.free(b),
        lambda: p.view(b),
        lambda: other.free(b),  # a remote free: the fast path's buffer
        lambda: other.free(theirs),
        lambda: other.view(b.handle, 8),
    ):
        with pytest.raises(client.ArenaClosed, match=re.escape(why)):
            call()
    with pytest.raises(client.ArenaClosed, match="closed for good"):
        ProcessCache(arena)
    assert arena.registry.active_slots() == active  # the refused claim took nothing
    p.close()
    other.close()  # closing a P of a closed arena works, and flushes into nothing


def test_a_stop_keeps_an_arena_live_ps_hold_and_closes_it_once_they_left(arena):

    p = ProcessCache(arena)
    daemon = Arena.attach(arena.name)  # another open file: it sees this process's P as live
    try:
        assert world.close_for_good(daemon, layout.CLOSED_STOPPED, unless_live=True) == [p.slot]
        assert arena.q[layout.HDR["closed"]] == 0 and p.alloc(64)
        p.close()
        assert world.close_for_good(daemon, layout.CLOSED_STOPPED, unless_live=True) == []
        assert arena.q[layout.HDR["closed"]] == layout.CLOSED_STOPPED
        with pytest.raises(client.ArenaClosed, match="stopped with no worker attached"):
            ProcessCache(arena)  # a worker that attached just before the unlink
    finally:
        daemon.close()


def test_a_closing_pause_leaves_every_stop_byte_closed_and_a_lost_one_is_caught_by_the_mark(arena):

    p = ProcessCache(arena)
    p.free(p.alloc(64))
    sw = arena.lay.slot_word(p.slot) + layout.SLOT["stop"]
    stw = world.StopTheWorld(arena, asymmetric=False)
    live = stw.begin(1)
    assert world.close_for_good(arena, layout.CLOSED_FORCED) == live == [p.slot]
    stw.end(flushed=set(live))  # would write RESYNC: the arena is closed, it writes CLOSED
    assert arena.q[sw] == layout.STOP_CLOSED
    # A P that wrote RUN over it (it read a RESYNC just before): its fast path runs on what it
    # holds, its next slow path meets the header's mark.
    arena.q[sw] = layout.STOP_RUN
    with pytest.raises(client.ArenaClosed):
        p.alloc(5000)
    p.close()


def test_an_arena_closed_for_good_but_left_in_place_is_replaced_not_adopted(start_daemon):
    """A forced stop killed between closing the arena and unlinking it: the next daemon removes
    it and makes a fresh one; the worker of the old one is not let back in."""

    d = start_daemon()
    w, cmds, res = connected(d)
    alloc_all(cmds, res, (64,))
    d.stop(signal.SIGKILL)
    spy = Arena.attach(d.name)
    try:
        old_id = spy.arena_id
        assert world.close_for_good(spy, layout.CLOSED_FORCED) != []
    finally:
        spy.close()
    d2 = start_daemon(endpoint=d.endpoint, name=d.name)
    assert "removed an arena closed for good" in d2.log() and "adopted=False" in d2.log(), d2.log()
    with client.connect(d2.endpoint) as heap:
        assert heap.arena.arena_id != old_id
    kind, msg = ask(cmds, res, "alloc", 64)
    assert kind == "error" and msg.startswith("ArenaClosed"), msg
    close_worker(w, cmds, res)


def test_a_closer_killed_half_way_leaves_a_healthy_arena_that_no_p_goes_on_using(arena):
    """SIGKILL inside close_for_good, the registry lock held, one P told and the other not: the
    kernel drops the lock, the arena's structures are intact, the told P raises at once and the
    other at its next slow path (its fast path runs on what it holds), and no P is claimed."""

    p0, p1 = ProcessCache(arena), ProcessCache(arena)
    for p in (p0, p1):
        p.free(p.alloc(64))
    ready = SPAWN.Event()
    closer = SPAWN.Process(target=mpworkers.stuck_closing, args=(arena.name, ready))
    closer.start()
    assert ready.wait(DEADLINE), "the closer never got inside close_for_good"
    os.kill(closer.pid, signal.SIGKILL)
    closer.join(DEADLINE)
    stop = layout.SLOT["stop"]
    assert arena.q[layout.HDR["closed"]] == layout.CLOSED_FORCED
    assert arena.q[arena.lay.slot_word(p0.slot) + stop] == layout.STOP_CLOSED
    assert arena.q[arena.lay.slot_word(p1.slot) + stop] == layout.STOP_RUN
    with pytest.raises(client.ArenaClosed):
        p0.alloc(64)
    b = p1.alloc(64)  # the fast path: listed before the close
    with pytest.raises(client.ArenaClosed):
        p1.alloc(5000)  # a refill: the slow path meets the mark
    with pytest.raises(client.ArenaClosed):
        ProcessCache(arena)  # the registry lock is free again: refused, not hung
    snap = assert_healthy(arena, p0, p1)  # flushed from outside, as the daemon flushes a P
    assert snap["heap_objects"] == 1 and b.handle
    p0.close()
    p1.close()
