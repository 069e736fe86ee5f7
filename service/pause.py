"""The daemon's side of a snapshot pause: stop every P, flush the stopped Ps' caches as soon as
no P still awaited is inside a call, read, resume.  See shm/__init__.py for the allocator's overview.

The handshake itself -- stop bytes, the `inside` words, membarrier, the resume lock -- is
shm.world.StopTheWorld, both halves in one module.  This module holds what only the daemon has:
the deadline, the STOP messages of the cooperative protocol (its ROUTER socket), the flushes,
the real-time priority of the pause, and the bookkeeping a snapshot reports (per_p, park_ns,
flush_ns, unflushed, stuck_locks).  The daemon's waits for arena locks are bounded
(Locks.wait_s): a flush that cannot take its locks in time is rolled back, its Ps are listed
unflushed, and the lock goes into stuck_locks -- the snapshot is then not consistent.
"""

import contextlib
import logging
import os
import time

import zmq

from client import protocol
from shm import layout as L
from shm.errors import LockUnavailable, ShmallocError

from .logs import event

RAGGED_WAIT_NS = 100_000  # how long the ragged round waits for a P caught inside a call
RAGGED_LOCK_WAIT_S = 1e-3  # ... and for a lock its flush needs that another P holds (that P may
# be waiting for a CPU, and the P stopped alone waits with it): past that the flush is rolled
# back and left to the pause.  Waiting up to the daemon's bound (LOCK_WAIT_S) stopped a P alone
# for 2.4-3.1 ms at p99 with 8 workers in tight loops on 2 cores; with this bound, 1.25-1.3 ms


PAUSE_PRIORITY = 2  # SCHED_FIFO priority of the daemon's pause (and scavenger steps)
LENT_PRIORITY = 1  # ... and of a P it waits for: below the pause's, so that a lent P, which runs
# its own code once its call returns, never keeps the daemon from the CPU it needs to take the
# priority back (two lent Ps computing at the daemon's own priority would, on two cores)


LEND_ALL_ROUND = 5  # a P still inside its call this many poll rounds into the pause (0.15 ms at
# the least) is lent the priority for its every thread, not its main thread alone (StoppedWorld._lend)


def lend_threads(pid):
    """Every thread of process `pid` but its main one that runs SCHED_OTHER to SCHED_FIFO at
    LENT_PRIORITY.  Returns the thread ids lent (give_back_threads), [] where not permitted or
    gone; a thread that is real-time already, or SCHED_BATCH or SCHED_IDLE, keeps its policy."""
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []
    lent = []
    for tid in tids:
        if tid == pid:
            continue
        try:
            if os.sched_getscheduler(tid) == os.SCHED_OTHER:
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(LENT_PRIORITY))
                lent.append(tid)
        except OSError:  # exited meanwhile, or not permitted
            pass
    return lent


def give_back_threads(tids):
    """The threads lend_threads lent, back to SCHED_OTHER."""
    for tid in tids:
        try:
            os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
        except OSError:
            pass


def set_realtime(on, pid=0):
    """This thread SCHED_FIFO at PAUSE_PRIORITY (or process `pid`'s main thread at LENT_PRIORITY),
    or back to SCHED_OTHER.  False where not permitted, or when `pid` is gone."""
    try:
        if on:
            prio = LENT_PRIORITY if pid else PAUSE_PRIORITY
            os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(prio))
        else:
            os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
        return True
    except (OSError, AttributeError):
        return False


def not_quiet(world):
    """Why the stopped `world` is not quiet enough to read or check (empty: it is): Ps that did
    not park, Ps whose flush could not take its locks, locks not taken in time or stranded."""
    why = [f"P {k} did not park before the deadline" for k in world["late"]]
    why += [f"P {k} was not flushed: a lock was not taken in time" for k in sorted(world["unflushed"])]
    why += [
        f"lock {s['lock']} is "
        + ("stranded" if s["stranded"] else "held")
        + (f" (its dirty word names pid {s['holder_pid']})" if s["holder_pid"] else "")
        for s in stuck_locks(world)
    ]
    return why


def stuck_locks(world):
    """The snapshot's `stuck_locks`: the locks the pause could not take in time, then any other
    lock found stranded at the end of the stop."""
    return world["stuck"] + [s for s in world.get("stranded", ()) if s not in world["stuck"]]


class StoppedWorld:
    """Context manager: every live P stopped (or listed late), every dead P reclaimed, every
    stopped P's cache flushed (_stop_everyone says when).  Resumes everyone on exit, whatever
    happened inside.  The handshake itself is shm.world.StopTheWorld; this class holds the
    deadline, the STOP messages of the cooperative protocol, and the bookkeeping."""

    def __init__(self, daemon, deadline_ms):
        self.d = daemon
        self.deadline_ms = deadline_ms

    def __enter__(self):
        arena, stw = self.d.arena, self.d.stw
        self.realtime = self.d.realtime_pause and set_realtime(True)
        self.boosted = {}  # slot -> pid of a P lent our priority while we wait for it (_lend)
        self.threads_lent = {}  # slot -> its other threads lent it too (_lend)
        self.holders = []  # pids of lock holders lent our priority while a flush waits (_lend_holder)
        try:
            ragged = self._ragged_round()
            t0 = time.perf_counter_ns()
            self.t0_mono = time.monotonic_ns()
            epoch = arena.q[L.HDR["epoch"]] + 1
            self.world = {
                "epoch": epoch,
                "t0": t0,
                "parked": [],
                "late": [],
                "per_p": {},
                "park_ns": 0,
                "flush_ns": 0,
                "flushed": set(),
                "unflushed": set(),  # stopped Ps whose flush could not take its locks in time
                "stuck": [],  # LockUnavailable.describe() of every lock not taken in time
                **ragged,
            }
            live = stw.begin(epoch)
            epoch = self.world["epoch"] = stw.epoch  # it may skip a resume byte still held
            self.world["stuck"] += stw.stuck
            return self._stop_everyone(epoch, t0, live)
        except BaseException:
            if hasattr(self, "world"):
                self.__exit__(None, None, None)
            elif self.realtime:  # failed in the ragged round, which resumed its P itself
                set_realtime(False)
            raise

    def _ragged_round(self):
        """Before the stop, flush the Ps one at a time while the others run (Go's forEachP, a
        ragged barrier): each P is stopped alone -- from our side, as the stop does it -- its
        cache flushed, and it is resumed at once.  The stop that follows then flushes only the
        Ps that made an allocator call since (Arena.flushed_clean): with workers that compute,
        sleep or wait between their calls, almost none, and the pause is no longer the sum of
        every P's flush.  What it costs each P is its own flush, once per snapshot, whatever
        the number of Ps.  A P caught inside a call is not waited for beyond RAGGED_WAIT_NS,
        nor a lock its flush needs beyond RAGGED_LOCK_WAIT_S: the stop takes it.  Only with the
        membarrier protocol (a cooperative P stops only by itself), and not with
        --no-ragged-flush.  Returns the snapshot's ragged_* figures (ragged_stop_max_ns: the
        longest any P was stopped alone, flushed or not)."""
        d, arena, stw = self.d, self.d.arena, self.d.stw
        out = {"ragged_ns": 0, "ragged_flushed": 0, "ragged_stop_max_ns": 0}
        if not d.ragged_flush or not stw.asymmetric:
            return out
        q, t = arena.q, time.perf_counter_ns()
        for k in arena.registry.active_slots():  # read without the registry lock: a hint
            if not stw.fast(k) or arena.flushed_clean(k):
                continue
            pid, flushed, asked = arena.registry.pid(k), (), ()
            t1 = time.perf_counter_ns()
            try:
                asked = stw.begin(q[L.HDR["epoch"]] + 1, only=(k,))
                if asked and self._stopped_alone(k, pid):
                    bound, arena.locks.wait_s = arena.locks.wait_s, RAGGED_LOCK_WAIT_S
                    try:
                        with self._lending_to_holders():
                            arena.flush_slots([k], arena.daemon_actor, keep_empty=True, disown=False)
                    finally:
                        arena.locks.wait_s = bound
                    flushed = (k,)
            except LockUnavailable:  # rolled back, its cache untouched: the stop flushes it
                pass
            finally:
                stopped_ns = stw.end(flushed) - t1
            if asked:  # stopped, flushed or not: what it paid
                out["ragged_stop_max_ns"] = max(out["ragged_stop_max_ns"], stopped_ns)
            if flushed:
                q[L.HDR["flush_count"]] += 1
                out["ragged_flushed"] += 1
        out["ragged_ns"] = time.perf_counter_ns() - t
        return out

    def _stopped_alone(self, k, pid):
        """Wait for P k, asked alone to stop, a short while at most: True once it is.  A P
        caught inside a call is lent our priority, as _lend does (it may be waiting for a CPU in
        the middle of it), and polled without sleeping: it parks at its next call, in
        microseconds."""
        stw, deadline, lent = self.d.stw, time.perf_counter_ns() + RAGGED_WAIT_NS, None
        try:
            while True:
                state = stw.poll(k, pid)
                if state in ("stopped", "parked") and stw.confirm([k]):
                    return True
                if state == "left" or time.perf_counter_ns() > deadline:
                    return False
                if lent is None:
                    lent = bool(self.realtime and pid) and set_realtime(True, pid)
                if lent:
                    os.sched_yield()
                else:
                    time.sleep(10e-6)
        finally:
            if lent:
                set_realtime(False, pid)

    def _stop_everyone(self, epoch, t0, live):
        d, arena, stw = self.d, self.d.arena, self.d.stw
        q = arena.q
        per_p = {
            k: {
                "slot": k,
                "pid": arena.registry.pid(k),
                "state": "late",
                "park_ns": 0,
                "cached_spans": 0,
                "listed_returned": 0,
            }
            for k in live
        }
        # A P of the cooperative protocol parks through its stop byte at its next call, or through
        # its control thread, which the STOP message wakes; a membarrier P needs neither.
        stop = protocol.encode_stop(epoch)
        for k in live:
            if not stw.fast(k):
                self._send_stop(k, stop)
        waiting, stopped = set(live), set()  # stopped: confirmed, not flushed yet
        deadline = t0 + self.deadline_ms * 1_000_000
        pause, rounds = 10e-6, 0
        while waiting:
            now = time.perf_counter_ns()
            rounds += 1
            found = []
            for k in list(waiting):
                state = stw.poll(k, per_p[k]["pid"])
                if state in ("stopped", "parked"):
                    found.append((k, state))
                elif state == "left":
                    per_p[k].update(state="left", park_ns=now - t0)  # closed its Heap meanwhile
                    waiting.discard(k)
                elif rounds % 8 == 1 and not arena.registry.alive(k):
                    per_p[k].update(state="dead", park_ns=now - t0)
                    waiting.discard(k)
            confirmed = set(stw.confirm([k for k, _ in found]))
            for k, state in found:
                if k not in confirmed:
                    continue
                at = (
                    q[arena.lay.slot_word(k) + L.SLOT["parked_ns"]] - self.t0_mono
                    if state == "parked"
                    else -1
                )
                per_p[k].update(state=state, park_ns=at if 0 <= at <= now - t0 else now - t0)
                waiting.discard(k)
            # A P that made no call since its last flush (the ragged round's, or the last
            # snapshot's) holds nothing a flush would change: it counts as flushed as it is.
            clean = {k for k in confirmed if arena.flushed_clean(k)}
            self.world["flushed"].update(clean)
            self._lend(waiting - {k for k, _ in found}, per_p, rounds, bool(confirmed - clean))
            stopped |= confirmed - clean
            # Flushed while the others are still on their way -- but only while none of them is
            # inside a call: that P may need a lock the flush holds (a refill), and it would
            # finish its call behind the flush, the next one behind the next flush (8 workers in
            # tight loops on 2 cores: Ps parked 0.1 ms apart, one per flush).  A P inside a call
            # parks microseconds after it runs; then they all go in one operation, each lock
            # taken once for them all.  A cooperative P on its way through its control thread
            # holds no lock: the flushes overlap its wait.
            if stopped and (not waiting or now > deadline or not any(map(stw.inside, waiting))):
                self._flush(sorted(stopped), per_p)
                stopped.clear()
            if not waiting or now > deadline:
                break
            for k in d.serve_light():
                if k in waiting and not stw.fast(k):
                    self._send_stop(k, stop)  # registered or re-bound during the pause
            time.sleep(pause)
            pause = min(pause * 2, 200e-6)
        self._unlend()
        for k in list(per_p):
            if per_p[k]["state"] == "dead":
                try:
                    arena.reclaim(k, arena.daemon_actor)
                    d.routes.pop(k, None)
                except LockUnavailable as e:
                    per_p[k]["state"] = "late"
                    self._stuck(e)
                except ShmallocError:
                    per_p[k]["state"] = "late"
        late = sorted(k for k, v in per_p.items() if v["state"] == "late")
        parked = sorted(k for k, v in per_p.items() if v["state"] in ("parked", "stopped"))
        self.world.update(
            parked=parked,
            late=late,
            per_p=per_p,
            park_ns=time.perf_counter_ns() - t0,
            stranded=arena.locks.stranded_locks(),
        )
        if late:
            event(
                logging.WARNING,
                "Ps did not park before the deadline",
                epoch=epoch,
                late=late,
                deadline_ms=self.deadline_ms,
            )
        return self.world

    def _lend(self, inside, per_p, rounds, flushing=False):
        """Lend our real-time priority to the Ps still inside a call after the first round (in
        the first already when stopped Ps wait for a flush, which waits for these): on
        a machine with more busy processes than cores the scheduler may have preempted one in
        the middle of its call, and the world waits until it runs again -- milliseconds.  At
        SCHED_FIFO it runs at once, finishes the call, and parks at its next one (or goes on
        with its own code: the next round finds it stopped and takes the priority back, within
        one poll interval).  Priority inheritance, as a lock would do it for its holder.  Only
        where our own pause is real-time (CAP_SYS_NICE), and only for a P asked to stop: it
        parks at its next call, where a running P lent it could keep a CPU at that priority for
        as long as it ran.  First its main thread alone; a P still inside LEND_ALL_ROUND rounds
        in, its every thread: its main thread may be waiting for the GIL, which another of its
        threads holds -- its control thread, which takes it for the heartbeat once a second,
        and which would otherwise wait for a CPU behind the busy workers while holding it (with
        8 workers in tight loops on 2 cores, the P that held the slowest pauses up was asleep on
        the GIL inside its call, seen in /proc)."""
        if not self.realtime or (rounds < 2 and not flushing):
            return
        stw = self.d.stw
        for k in inside - self.boosted.keys():
            pid = per_p[k]["pid"]
            # A P of the cooperative protocol may be outside, at its own work: not it.
            if pid and stw.fast(k) and set_realtime(True, pid):
                self.boosted[k] = pid
        if rounds >= LEND_ALL_ROUND:
            for k in (inside & self.boosted.keys()) - self.threads_lent.keys():
                self.threads_lent[k] = lend_threads(self.boosted[k])
        for k in self.boosted.keys() - inside:
            self._unlend(k)

    def _unlend(self, k=None):
        """Take the lent priority back from P k (None: from every P that has it)."""
        for j in list(self.boosted) if k is None else [k]:
            give_back_threads(self.threads_lent.pop(j, ()))
            set_realtime(False, self.boosted.pop(j))

    def _flush(self, ks, per_p):
        """Flush the caches of the stopped Ps `ks` now (Go: flushmcache).  Their spans go back to
        the central lists while other Ps may still run: every change they make is an operation
        under the same locks, and nothing is read before every P is stopped and flushed."""
        if not ks:
            return
        arena, w = self.d.arena, self.world
        if w["stuck"]:  # one lock already failed us: do not wait for it again in this pause
            w["unflushed"].update(ks)
            return
        t = time.perf_counter_ns()
        try:
            with self._lending_to_holders():
                done = arena.flush_slots(ks, arena.daemon_actor, keep_empty=True, disown=False)
        except LockUnavailable as e:  # rolled back: their caches are untouched
            w["unflushed"].update(ks)
            w["flush_ns"] += time.perf_counter_ns() - t
            self._stuck(e)
            return
        for k in ks:
            per_p[k].update(cached_spans=done[k][0], listed_returned=done[k][1])
            w["flushed"].add(k)
            arena.q[L.HDR["flush_count"]] += 1
        w["flush_ns"] += time.perf_counter_ns() - t

    @contextlib.contextmanager
    def _lending_to_holders(self):
        """While a flush of ours runs: a lock it must wait for is held by a P in the middle of a
        call, which the scheduler may have preempted -- lend that P our priority until the flush
        ends, as _lend does for a P we wait for (priority inheritance).  The lent P runs at most
        as long as our flush at that priority: we take it back as soon as the flush is done."""
        if not self.realtime:
            yield
            return
        locks = self.d.arena.locks
        locks.on_wait = self._lend_holder
        try:
            yield
        finally:
            locks.on_wait = None
            for pid in self.holders:
                set_realtime(False, pid)
            self.holders.clear()

    def _lend_holder(self, lid):
        pid, _ = self.d.arena.locks.holder(lid)
        if pid and pid not in self.holders and pid not in self.boosted.values() and set_realtime(True, pid):
            self.holders.append(pid)

    def _stuck(self, e):
        """A lock the pause could not take within the daemon's bound: the snapshot says so."""
        if e.describe() not in self.world["stuck"]:
            self.world["stuck"].append(e.describe())

    def _send_stop(self, k, frame):
        """The STOP message wakes a cooperative P's control thread."""
        ident = self.d.routes.get(k)
        if ident is not None:
            try:
                self.d.sock.send_multipart([ident, frame], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def __exit__(self, *exc):
        w = self.world
        # The pause ends when the stop bytes clear, before the parked Ps wake (on a busy machine
        # the kernel may run them before it returns to us: their time, not the pause's), and
        # before this thread gives up its real-time priority (which lets others run first).
        self._unlend()  # before any P resumes
        pause_ns = self.d.stw.end(w.get("flushed", ())) - w["t0"]
        if self.realtime:
            set_realtime(False)
        stuck = stuck_locks(w)
        unflushed = sorted(set(w["late"]) | w["unflushed"])
        w["meta"] = {
            "consistent": not unflushed and not stuck,
            "epoch": w["epoch"],
            "pause_ns": pause_ns,
            "park_ns": w["park_ns"],
            "flush_ns": w["flush_ns"],
            "num_p": sum(1 for v in w["per_p"].values() if v["state"] in ("parked", "stopped", "late")),
            "unflushed": unflushed,
            "stuck_locks": stuck,
            "per_p": [w["per_p"][k] for k in sorted(w["per_p"])],
            "taken_ns": time.time_ns(),
            "stop_protocol": self.d.stw.protocol,
            "ragged_ns": w["ragged_ns"],
            "ragged_flushed": w["ragged_flushed"],
            "ragged_stop_max_ns": w["ragged_stop_max_ns"],
        }
        return False
