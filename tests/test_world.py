"""Stopping the world (shm/world.py): a P outside the allocator is stopped from the daemon's side
(its `inside` word, its stop byte, membarrier); one inside a call is waited for; the cooperative
protocol where membarrier is missing; a RUN written over a PARK; a daemon killed and not reaped."""

import os
import signal
import threading
import time

import mpworkers
import pytest
from support import DEADLINE, spawn_victim
from test_daemon import SPAWN, finish_workers, observe, start_workers

import client
from service.demo import pattern
from shm import Arena, ProcessCache, identities, layout, world
from shm.sizeclasses import SIZE_TO_CLASS

SL = layout.SLOT
needs_membarrier = pytest.mark.skipif(
    not world.membarrier_supported(), reason="membarrier(2) unavailable here"
)


def connect_worker(d):
    cmds, res = SPAWN.Queue(), SPAWN.Queue()
    w = SPAWN.Process(target=mpworkers.connected_worker, args=(d.endpoint, cmds, res))
    w.start()
    kind, slot = res.get(timeout=DEADLINE)
    assert kind == "slot"
    return w, cmds, res, slot


def close_worker(w, cmds, res):
    cmds.put(("close",))
    assert res.get(timeout=DEADLINE) == ("ok", None)
    w.join(DEADLINE)
    assert w.exitcode == 0


def verify_free_and_close(w, cmds, res, h):
    """The worker's 64-byte block `h` still holds its pattern; freed; the worker closed."""
    cmds.put(("verify", h, 64))
    assert res.get(timeout=DEADLINE) == ("ok", None)
    cmds.put(("free", h))
    assert res.get(timeout=DEADLINE)[0] == "ok"
    close_worker(w, cmds, res)


@needs_membarrier
@pytest.mark.parametrize("ragged", [True, False], ids=["ragged round", "--no-ragged-flush"])
def test_an_idle_worker_is_stopped_and_flushed_without_its_help(start_daemon, ragged):
    """The worker's main thread sits in a queue read: never inside the allocator.  The daemon
    stops it from its own side -- no STOP message, no GIL -- and flushes its cache: in the
    ragged round before the pause (stopped alone), so that the pause finds it made no call
    since and has nothing left to flush; or, without that round, in the pause."""
    d = start_daemon(extra=() if ragged else ("--no-ragged-flush",))
    w, cmds, res, slot = connect_worker(d)
    cmds.put(("alloc", 64))
    kind, h = res.get(timeout=DEADLINE)
    snap = client.stats(d.endpoint, slow=True)
    assert snap["stop_protocol"] == "membarrier"
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == []
    (p,) = snap["per_p"]
    assert p["state"] == "stopped", p
    if ragged:
        assert snap["ragged_flushed"] == 1 and snap["ragged_stop_max_ns"] > 0, snap
        assert p["cached_spans"] == 0, p  # the ragged round took them: nothing left to redo
    else:
        assert snap["ragged_flushed"] == 0 and snap["ragged_ns"] == 0, snap
        assert p["cached_spans"] >= 1, p
    assert snap["heap_objects"] == 1
    # A second snapshot: the worker made no call since, so neither the round nor the pause
    # flushes it again.
    again = client.stats(d.endpoint, slow=True)
    assert again["consistent"] and again["slow_equal"] and again["ragged_flushed"] == 0
    assert [p["cached_spans"] for p in again["per_p"]] == [0]
    # Its local lists were flushed under it: its next calls resync and hand out nothing twice.
    cmds.put(("alloc", 64))
    kind2, h2 = res.get(timeout=DEADLINE)
    assert kind2 == "ok" and h2 != h
    snap = client.stats(d.endpoint, slow=True)  # it called since: flushed again, in one place
    assert snap["consistent"] and snap["slow_equal"] and snap["heap_objects"] == 2
    assert snap["ragged_flushed"] == (1 if ragged else 0)
    assert [p["cached_spans"] for p in snap["per_p"]] == [0 if ragged else 1]
    cmds.put(("free", h))
    assert res.get(timeout=DEADLINE)[0] == "ok"
    cmds.put(("free", h2))
    assert res.get(timeout=DEADLINE)[0] == "ok"
    close_worker(w, cmds, res)
    snap = client.stats(d.endpoint, slow=True)
    assert snap["heap_objects"] == 0 and snap["slow_equal"]


@needs_membarrier
def test_a_ragged_flush_that_cannot_take_its_lock_is_left_to_the_pause(start_daemon):
    """Another process holds the central lock of the worker's class: the ragged round's flush
    waits for it a short while only (RAGGED_LOCK_WAIT_S), rolls back and resumes the P with its
    cache untouched; the pause then stops it and tries again, and, the lock still held, says so
    (not consistent, the P unflushed, the lock stuck).  Released, the next snapshot is exact."""
    from service.daemon import LOCK_WAIT_S

    d = start_daemon()
    w, cmds, res, slot = connect_worker(d)
    cmds.put(("alloc", 64))
    kind, h = res.get(timeout=DEADLINE)
    assert kind == "ok"
    holder = Arena.attach(d.name)
    c = SIZE_TO_CLASS[64 >> 3]
    lid = layout.LOCK_CENTRAL(c)
    holder.locks.raw_acquire(lid)
    try:
        snap = client.stats(d.endpoint)
    finally:
        holder.locks.raw_release(lid)
        holder.close()
    assert snap["ragged_flushed"] == 0 and snap["ragged_stop_max_ns"] > 0, snap
    # It gave up long before the daemon's own bound, which the stop would otherwise have lasted.
    assert snap["ragged_stop_max_ns"] < LOCK_WAIT_S * 1e9, snap["ragged_stop_max_ns"]
    assert not snap["consistent"] and snap["unflushed"] == [slot], snap
    assert [s["lock"] for s in snap["stuck_locks"]] == [f"central[{c}]"], snap["stuck_locks"]
    (p,) = snap["per_p"]
    assert p["state"] == "stopped" and p["cached_spans"] == 0, p
    snap = client.stats(d.endpoint, slow=True)
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == []
    assert snap["ragged_flushed"] == 1 and snap["heap_objects"] == 1
    verify_free_and_close(w, cmds, res, h)


@needs_membarrier
def test_no_stopped_p_is_flushed_while_a_p_the_pause_waits_for_is_inside_a_call(start_daemon):
    """Worker A is idle with a cached span (stopped from the daemon's side at once); worker B
    sits inside a call.  The pause waits for B before it flushes A: B may need a lock A's flush
    would hold.  Once B leaves its call and parks, both are flushed and the snapshot is exact."""
    d = start_daemon(extra=("--no-ragged-flush", "--park-deadline-ms", "60000"))
    a, cmds, res, slot_a = connect_worker(d)
    cmds.put(("alloc", 64))
    kind, h = res.get(timeout=DEADLINE)
    assert kind == "ok"
    ready, go, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    b = SPAWN.Process(target=mpworkers.held_inside_worker, args=(d.endpoint, ready, go, out))
    b.start()
    assert ready.wait(DEADLINE)
    arena = Arena.attach(d.name)
    snaps = []
    t = threading.Thread(
        target=lambda: snaps.append(client.stats(d.endpoint, slow=True, timeout_ms=int(DEADLINE * 1000)))
    )
    t.start()
    try:
        cached = arena.lay.slot_word(slot_a) + layout.SLOT_CACHED_AT
        stop_a = arena.lay.slot_word(slot_a) + SL["stop"]
        end = time.monotonic() + DEADLINE
        while arena.q[stop_a] != layout.STOP_PARK and time.monotonic() < end:
            time.sleep(0.001)
        assert arena.q[stop_a] == layout.STOP_PARK, "the pause never asked A to stop"
        # A is outside any call: the pause judges it stopped within its first rounds, and
        # flushed it there before.  Still cached a good while later: held back for B.
        time.sleep(0.2)
        assert any(arena.q[cached : cached + layout.NCLASS].tolist()), "A was flushed while B was inside"
        assert t.is_alive(), "the snapshot ended with B inside a call"
    finally:
        go.set()
        t.join(DEADLINE)
        arena.close()
    assert out.get(timeout=DEADLINE)[0] == "ok"
    b.join(DEADLINE)
    assert b.exitcode == 0
    (snap,) = snaps
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == []
    states = {p["slot"]: p for p in snap["per_p"]}
    assert states[slot_a]["state"] == "stopped" and states[slot_a]["cached_spans"] >= 1, states
    assert snap["heap_objects"] == 1
    cmds.put(("free", h))
    assert res.get(timeout=DEADLINE)[0] == "ok"
    close_worker(a, cmds, res)


def test_without_membarrier_the_cooperative_protocol_parks_through_the_control_thread(
    start_daemon, monkeypatch
):
    monkeypatch.setenv("SHMALLOC_NO_MEMBARRIER", "1")  # the daemon and its workers inherit it
    d = start_daemon()
    assert "membarrier(2) unavailable" in d.log()
    w, cmds, res, slot = connect_worker(d)
    cmds.put(("alloc", 64))
    assert res.get(timeout=DEADLINE)[0] == "ok"
    snap = client.stats(d.endpoint, slow=True)
    assert snap["stop_protocol"] == "cooperative"
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == []
    assert [p["state"] for p in snap["per_p"]] == ["parked"]
    close_worker(w, cmds, res)


@needs_membarrier
def test_a_worker_that_could_not_register_is_stopped_the_cooperative_way(start_daemon, monkeypatch):
    d = start_daemon()
    monkeypatch.setenv("SHMALLOC_NO_MEMBARRIER", "1")  # only the worker, started after
    w, cmds, res, slot = connect_worker(d)
    spy = Arena.attach(d.name)
    try:
        assert spy.q[spy.lay.slot_word(slot) + SL["barrier"]] == 0
    finally:
        spy.close()
    snap = client.stats(d.endpoint)
    assert snap["stop_protocol"] == "membarrier" and snap["consistent"]
    assert [p["state"] for p in snap["per_p"]] == ["parked"]  # its control thread parked it
    close_worker(w, cmds, res)


@needs_membarrier
def test_poll_and_confirm_never_judge_a_running_p_stopped(arena):
    """The P writes RUN over a RESYNC just as the daemon asks it to park (the one store a P makes
    to its stop byte): the daemon must notice and ask again, never flush a running P."""
    p = ProcessCache(arena)
    b = p.alloc(64)
    stw = world.StopTheWorld(arena, asymmetric=True)
    sw = arena.lay.slot_word(p.slot)
    live = stw.begin(1)
    assert live == [p.slot] and arena.q[sw + SL["stop"]] == layout.STOP_PARK
    pid = os.getpid()
    # Caught inside a call: waited for.
    arena.q[sw + SL["inside"]] = 1
    assert stw.poll(p.slot, pid) is None
    # Inside, it writes RUN over the PARK (it had read a RESYNC): asked again, still waited for.
    arena.q[sw + SL["stop"]] = layout.STOP_RUN
    assert stw.poll(p.slot, pid) is None
    assert arena.q[sw + SL["stop"]] == layout.STOP_PARK
    # Out of the call: stopped -- unless it erased the PARK again before the confirming barrier.
    arena.q[sw + SL["inside"]] = 0
    assert stw.poll(p.slot, pid) == "stopped"
    arena.q[sw + SL["stop"]] = layout.STOP_RUN
    assert stw.confirm([p.slot]) == []
    assert stw.poll(p.slot, pid) is None  # re-asked
    assert stw.poll(p.slot, pid) == "stopped" and stw.confirm([p.slot]) == [p.slot]
    arena.flush_slots([p.slot], keep_empty=True)
    stw.end({p.slot})
    assert arena.q[sw + SL["stop"]] == layout.STOP_RESYNC
    b2 = p.alloc(64)  # resyncs: drops the flushed lists, refills
    assert b2.handle != b.handle
    p.free(b)
    p.free(b2)
    p.close()


def _waiting_for_lock(arena, lid):
    """Does some open file description wait (blocked in F_OFD_SETLKW) for lock `lid` of
    `arena`?  /proc/locks lists each waiter after a '->'."""
    ino, byte = os.fstat(arena.fd).st_ino, arena.locks.byte(lid)
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts and parts[-3].endswith(f":{ino}") and parts[-2] == str(byte):
                return True
    return False


@needs_membarrier
@pytest.mark.parametrize("what", ["refill", "large", "apply"])
def test_a_p_waiting_for_its_calls_first_lock_is_stopped_without_waiting_for_it(arena, what):
    """A P whose call waits for its first lock (other Ps refilling the same class hold it, one
    after another) is not inside the allocator meanwhile: the daemon takes it as stopped at
    once, as it does a P outside any call, and may flush its cache.  Once the P holds the lock
    it reads its stop byte again, lets the lock go with nothing written, parks, and starts its
    call again after the stop -- on the lists the flush left it.  For a refill, an alloc of a
    large block, and a free that finds its remote-free buffer full."""
    small = layout.LOCK_CENTRAL(SIZE_TO_CLASS[64 // 8])
    lid = layout.LOCK_HEAP if what == "large" else small
    producer = ProcessCache(arena)
    given = [producer.alloc(64) for _ in range(layout.RFREE_CAP + 1)] if what == "apply" else []
    for b in given:
        b.buf[:] = pattern(b.handle, b.size)
    ready, go, results = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Queue()
    child = SPAWN.Process(
        target=mpworkers.call_behind_a_lock,
        args=(arena.name, what, [b.handle for b in given], ready, go, results),
    )
    child.start()
    holder = Arena.attach(arena.name)  # another file description: the Ps ahead of this one
    try:
        k, registered = ready.get(timeout=DEADLINE)
        assert registered, "the child could not register for membarrier"
        if what == "apply":  # verified now: the child frees them
            for b in given:
                assert bytes(b.buf) == pattern(b.handle, b.size)
        holder.locks.raw_acquire(lid)
        go.put("call")
        end = time.monotonic() + DEADLINE
        while not _waiting_for_lock(arena, lid) and time.monotonic() < end:
            time.sleep(0.001)
        assert _waiting_for_lock(arena, lid), "the child never waited for the lock"
        stw = world.StopTheWorld(arena, asymmetric=True)
        assert sorted(stw.begin(1)) == sorted([k, producer.slot])
        assert stw.poll(k, child.pid) == "stopped" and stw.confirm([k]) == [k]
        holder.locks.raw_release(lid)  # the P takes it, finds itself stopped, lets it go, parks
        end = time.monotonic() + DEADLINE
        while arena.q[arena.lay.slot_word(k) + SL["parked"]] != stw.epoch and time.monotonic() < end:
            time.sleep(0.001)
        assert arena.q[arena.lay.slot_word(k) + SL["parked"]] == stw.epoch, "the P did not park"
        # Flushed while it was stopped: its span of 1000-byte blocks goes back (its lists are
        # stale from here: it resyncs when it resumes), and its full buffer is applied.
        assert arena.flush_slots([k], keep_empty=True)[k][0] == 1
        assert arena.q[arena.lay.slot_word(k) + SL["rfree_n"]] == 0
        stw.end({k})
        assert results.get(timeout=DEADLINE) == 1  # parked once, then the call went through
        go.put("free")
        assert results.get(timeout=DEADLINE) is True, "a block lost its pattern"
        child.join(DEADLINE)
        assert child.exitcode == 0
    finally:
        holder.close()
        if child.is_alive():
            child.kill()
            child.join(DEADLINE)
    producer.close()  # every block it gave was freed once (none is left, none was bad)
    assert arena.check_all() == []
    stats = arena.read_stats()
    assert identities(stats) == [] and stats["heap_objects"] == 0
    assert stats["bad_frees"] == 0


def test_a_parked_worker_goes_on_when_the_daemon_dies_unreaped(start_daemon):
    """The daemon is SIGKILLed mid-pause and left a zombie: its pid still exists, but the kernel
    dropped its locks.  The parked worker must not wait on a stop nobody will lift."""
    d = start_daemon(extra=("--park-deadline-ms", "30000"))
    ready, release, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    stuck = SPAWN.Process(target=mpworkers.stuck_worker, args=(d.endpoint, ready, release, out))
    stuck.start()
    w, cmds, res, slot = connect_worker(d)
    spy = Arena.attach(d.name)
    try:
        cmds.put(("alloc", 64))
        assert res.get(timeout=DEADLINE)[0] == "ok"
        assert ready.wait(DEADLINE)
        asker = SPAWN.Process(target=client.stats, args=(d.endpoint, 10000))
        asker.start()
        sw = spy.lay.slot_word(slot)
        end = time.monotonic() + DEADLINE
        while spy.q[sw + SL["stop"]] != layout.STOP_PARK or not spy.q[layout.HDR["stopped_epoch"]]:
            assert time.monotonic() < end, "the world never stopped"
            time.sleep(0.005)
        cmds.put(("alloc", 64))  # parks on the resume lock
        while spy.q[sw + SL["parked"]] != spy.q[layout.HDR["stopped_epoch"]]:
            assert time.monotonic() < end, "the worker's call never parked"
            time.sleep(0.005)
        os.kill(d.proc.pid, signal.SIGKILL)  # not reaped: a zombie until d.proc.wait()
        time.sleep(0.2)
        assert os.path.exists(f"/proc/{d.proc.pid}"), "the daemon should still be an unreaped zombie"
        assert res.get(timeout=DEADLINE)[0] == "ok"  # the parked call went on
        asker.kill()
        asker.join(DEADLINE)
    finally:
        release.set()
        spy.close()
    out.get(timeout=DEADLINE)
    stuck.join(DEADLINE)
    close_worker(w, cmds, res)
    d.proc.wait(DEADLINE)
    from shm.arena import unlink_segment

    unlink_segment(d.name)
    os.unlink(d.sock_path())


def snapshot_beside(d, target, deadline_ms):
    """Start target(endpoint, ready, out) in a worker process; once it is ready, take a slow
    snapshot (park deadline `deadline_ms`), then wait for the worker's report and its exit.
    Returns (snapshot, report)."""
    ready, out = SPAWN.Event(), SPAWN.Queue()
    w = SPAWN.Process(target=target, args=(d.endpoint, ready, out))
    w.start()
    assert ready.wait(DEADLINE)
    snap = client.stats(d.endpoint, deadline_ms=deadline_ms, slow=True, timeout_ms=int(DEADLINE * 1000))
    report = out.get(timeout=DEADLINE)
    w.join(DEADLINE)
    assert w.exitcode == 0
    return snap, report


def _may_go_realtime():
    from service.pause import set_realtime

    return set_realtime(True) and set_realtime(False)


@needs_membarrier
@pytest.mark.skipif(not _may_go_realtime(), reason="SCHED_FIFO not permitted here (CAP_SYS_NICE)")
def test_a_worker_caught_inside_a_call_is_lent_the_pause_priority_and_gives_it_back(start_daemon):
    """A P the scheduler preempted in the middle of a call holds the world up until it runs
    again.  The daemon, real-time for its pause, lends the P its priority while it waits, and
    takes it back before anyone resumes.  The worker leaves its call only once it sees
    SCHED_FIFO: without the loan the snapshot would end at its deadline, not consistent."""
    d = start_daemon(extra=("--park-deadline-ms", "30000"))
    snap, (inside, after) = snapshot_beside(d, mpworkers.preempted_worker, 10000)
    assert inside == os.SCHED_FIFO, "the daemon never lent the P inside a call its priority"
    assert after == os.SCHED_OTHER, "the P kept the real-time priority after the pause"
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == []
    (p,) = snap["per_p"]
    assert p["state"] in ("stopped", "parked"), p


@needs_membarrier
@pytest.mark.skipif(not _may_go_realtime(), reason="SCHED_FIFO not permitted here (CAP_SYS_NICE)")
def test_a_lock_a_flush_waits_for_is_lent_to_its_holder_until_the_flush_ends(start_daemon):
    """A process holds the central lock a worker's flush needs and lets it go only once it runs
    real-time; it is outside any allocator call, so the stop takes it as stopped and never
    lends it anything.  The daemon, real-time for its pause, lends its priority to the holder
    its flush waits for (the lock's dirty word names it), as a lock would, and takes it back
    when the flush ends: the snapshot is exact.  Without the loan the flush gives up at the
    daemon's bound and the snapshot says the lock was stuck."""
    import multiprocessing as mp

    d = start_daemon()
    w, cmds, res, slot = connect_worker(d)
    cmds.put(("alloc", 64))
    kind, h = res.get(timeout=DEADLINE)
    assert kind == "ok"
    done = mp.get_context("spawn").Event()
    lid = layout.LOCK_CENTRAL(SIZE_TO_CLASS[64 >> 3])
    holder, ready, out = spawn_victim(mpworkers.holding_a_lock_worker, d.name, lid, done)
    try:
        assert ready.wait(DEADLINE)
        snap = client.stats(d.endpoint, slow=True)
        assert out.get(timeout=DEADLINE) == os.SCHED_FIFO, "the holder was never lent the priority"
    finally:
        done.set()
    assert out.get(timeout=DEADLINE) == os.SCHED_OTHER, "the holder kept the priority"
    holder.join(DEADLINE)
    assert holder.exitcode == 0
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == [], snap["stuck_locks"]
    assert snap["heap_objects"] == 1
    verify_free_and_close(w, cmds, res, h)


@needs_membarrier
@pytest.mark.skipif(not _may_go_realtime(), reason="SCHED_FIFO not permitted here (CAP_SYS_NICE)")
def test_a_worker_waiting_inside_a_call_for_the_gil_its_other_thread_holds_is_lent_on_every_thread(
    start_daemon,
):
    """The worker's main thread is inside a call, asleep on the GIL, which another of its threads
    holds and lets go only once it runs real-time.  Lending the main thread alone would leave the
    world waiting until the deadline; the daemon lends every thread of a P still inside a few
    rounds into the pause, and gives each its policy back before anyone resumes."""
    d = start_daemon(extra=("--park-deadline-ms", "5000"))
    snap, (holder, after, holder_after) = snapshot_beside(d, mpworkers.gil_held_elsewhere_worker, 5000)
    assert holder == os.SCHED_FIFO, "the daemon never lent the thread holding the GIL its priority"
    assert (after, holder_after) == (os.SCHED_OTHER, os.SCHED_OTHER), "a thread kept the priority"
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == [], snap["unflushed"]
    (p,) = snap["per_p"]
    assert p["state"] in ("stopped", "parked"), p


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["membarrier", "cooperative"])
def test_snapshots_as_fast_as_the_daemon_allows_while_workers_free_across_processes(
    start_daemon, monkeypatch, protocol
):
    """Four workers hammer alloc/free, a third of their blocks freed by another process (every
    block verified by pattern before it is freed: overlapping blocks fail), while an observer
    takes 150 snapshots back to back, each checked for identities and fast == slow."""
    if protocol == "membarrier" and not world.membarrier_supported():
        pytest.skip("membarrier(2) unavailable here")
    if protocol == "cooperative":
        monkeypatch.setenv("SHMALLOC_NO_MEMBARRIER", "1")
    d = start_daemon()
    procs, boxes, results, until = start_workers(d, 4)
    seen = observe(d.endpoint, 150)
    res = finish_workers(d, procs, boxes, results, until)
    assert seen["problems"] == []
    assert sum(r["received"] for r in res) > 0, "no block crossed processes"
    final = client.stats(d.endpoint, slow=True)
    assert final["stop_protocol"] == protocol
    assert final["consistent"] and final["slow_equal"] and identities(final) == []
    assert final["heap_objects"] == 0 and final["bad_frees"] == 0


def test_a_resync_owed_from_an_earlier_flush_survives_a_pause_that_skips_the_p(arena):
    """Found by the hypothesis model: P1 was flushed (RESYNC) and has not run since; a later
    pause stops it (PARK over the RESYNC) but flushes only P0.  Resumed with RUN, P1 would pop
    from its stale lists and hand out a block twice."""
    p0, p1 = ProcessCache(arena), ProcessCache(arena)
    b = p1.alloc(8)
    arena.flush_slots([p1.slot])
    stw = world.StopTheWorld(arena, asymmetric=False)
    stw.begin(1)
    arena.flush_slots([p0.slot], keep_empty=True)
    stw.end({p0.slot})
    assert arena.q[arena.lay.slot_word(p1.slot) + SL["stop"]] == layout.STOP_RESYNC
    c = p1.alloc(8)
    assert c.handle != b.handle
    for x in (b, c):
        p1.free(x)
    p0.close()
    p1.close()


def test_the_control_thread_parks_without_switching_the_heap_to_shared_mode(start_daemon, monkeypatch):
    """The cooperative protocol parks a P through its control thread: that must not count as a
    call from a second thread (which would put the Heap in locked mode for good)."""
    monkeypatch.setenv("SHMALLOC_NO_MEMBARRIER", "1")
    d = start_daemon()
    heap = client.connect(d.endpoint)
    try:
        b = heap.alloc(64)
        snap = client.stats(d.endpoint)
        assert snap["stop_protocol"] == "cooperative" and [p["state"] for p in snap["per_p"]] == ["parked"]
        assert not heap.shared and heap.parks == 1
        c = heap.alloc(64)  # resyncs on the owner thread
        heap.free(b)
        heap.free(c)
        assert not heap.shared
    finally:
        heap.close()


def test_a_stop_never_waits_for_a_resume_byte_a_waking_p_still_holds(arena):
    """A P woken from an earlier stop holds its resume byte's read lock from the instant the
    daemon lifts the stop until the P runs again: on a machine with more busy processes than
    cores, milliseconds (with 8 workers in tight loops on 2 cores, one pause in a few hundred
    waited 13-25 ms for it).  A stop whose byte is so held takes the next epoch whose byte is
    free instead; its Ps are asked to stop for that epoch and would sleep on that byte."""
    import fcntl

    from shm.locks import _flock, ofd_held_elsewhere

    p = ProcessCache(arena)
    b = p.alloc(64)
    waking = Arena.attach(arena.name)  # another open file description: the P still waking
    e = arena.q[layout.HDR["epoch"]] + 1
    byte = layout.resume_lock_byte
    fcntl.fcntl(waking.fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_RDLCK, byte(e)))
    arena.locks.wait_s = 0.05  # bounded, as the daemon's (a worker's wait would never end)
    stw = world.StopTheWorld(arena, asymmetric=False)
    try:
        assert stw.begin(e) == [p.slot]
        assert stw.epoch == e + 1 and arena.q[layout.HDR["epoch"]] == e + 1
        assert arena.q[arena.lay.slot_word(p.slot) + SL["stop_epoch"]] == e + 1
        assert ofd_held_elsewhere(waking.fd, byte(e + 1)), "the stop does not hold its resume byte"
        stw.end(set())
        assert not ofd_held_elsewhere(waking.fd, byte(e + 1))
    finally:
        arena.locks.wait_s = None
        waking.close()
    c = p.alloc(64)
    assert c.handle != b.handle
    p.free(b)
    p.free(c)
    assert identities(arena.read_stats()) == []
    p.close()


def test_frees_a_full_buffer_keeps_for_their_owner_are_flushed_by_a_snapshot(start_daemon):
    """Two workers under the daemon, each a real process.  The consumer frees 192 of the
    producer's 256 blocks of 100 KB, and the producer takes all 192 back by allocating again;
    the consumer frees the other 64, which fills its buffer, and its next free applies it but for
    those 64, still waiting for the producer.  A snapshot then flushes them with everything else
    -- consistent, its identities holding, fast == slow -- and every block checked before it is
    freed shows no block was handed out twice."""
    d = start_daemon()
    prod, pc, pr, _ = connect_worker(d)
    cons, cc, cr, cslot = connect_worker(d)

    def do(cmds, res, *cmd):
        cmds.put(cmd)
        kind, val = res.get(timeout=DEADLINE)
        assert kind == "ok", val
        return val

    def check_and_free(h):
        do(cc, cr, "verify", h, size)
        do(cc, cr, "free", h)

    size = 100_000
    first = [do(pc, pr, "alloc", size) for _ in range(layout.RFREE_CAP)]
    for h in first[:192]:
        check_and_free(h)
    second = [do(pc, pr, "alloc", size) for _ in range(192)]
    assert sorted(second) == sorted(layout.next_handle(h) for h in first[:192]), "not all taken back"
    for h in first[192:]:
        check_and_free(h)
    check_and_free(second[0])  # the buffer is full: applied, but for the 64 its owner may take back
    arena = Arena.attach(d.name)
    try:
        buffered = arena.buffered_frees(cslot)
        assert buffered[:64] == sorted(first[192:]) and len(buffered) == 65
        assert {arena.mv[arena.lay.amap_byte(h)] for h in buffered[:64]} == {layout.RFREED}
    finally:
        arena.close()
    snap = client.stats(d.endpoint, slow=True)  # flushes both workers: the kept frees applied
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == []
    assert snap["large_frees"] == layout.RFREE_CAP + 1 and snap["bad_frees"] == 0
    assert snap["heap_objects"] == 191
    third = [do(pc, pr, "alloc", size) for _ in range(64)]
    assert not set(third) & set(second), "a live block handed out twice"
    for h in second[1:] + third:
        check_and_free(h)
    close_worker(cons, cc, cr)
    close_worker(prod, pc, pr)
    final = client.stats(d.endpoint, slow=True)
    assert final["consistent"] and final["slow_equal"] and identities(final) == []
    assert final["heap_objects"] == 0 and final["bad_frees"] == 0
