"""The daemon's side of a snapshot pause: stop every P, flush each cache as soon as its P is
stopped, read, resume.  See shm/__init__.py for the allocator's overview.

The handshake itself -- stop bytes, the `inside` words, membarrier, the resume lock -- is
shm.world.StopTheWorld, both halves in one module.  This module holds what only the daemon has:
the deadline, the STOP messages of the cooperative protocol (its ROUTER socket), the flushes,
the real-time priority of the pause, and the bookkeeping a snapshot reports (per_p, park_ns,
flush_ns, unflushed).
"""

import logging
import os
import time

import zmq

from client import protocol
from shm import layout as L
from shm.errors import ShmallocError

from .logs import event


def set_realtime(on):
    """This thread SCHED_FIFO (priority 1) or back to SCHED_OTHER.  False where not permitted."""
    try:
        if on:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        else:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        return True
    except (OSError, AttributeError):
        return False


class StoppedWorld:
    """Context manager: every live P stopped (or listed late), every dead P reclaimed, each
    stopped P's cache flushed as soon as it is stopped.  Resumes everyone on exit, whatever
    happened inside.  The handshake itself is shm.world.StopTheWorld; this class holds the
    deadline, the STOP messages of the cooperative protocol, and the bookkeeping."""

    def __init__(self, daemon, deadline_ms):
        self.d = daemon
        self.deadline_ms = deadline_ms

    def __enter__(self):
        arena, stw = self.d.arena, self.d.stw
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
        }
        self.realtime = self.d.realtime_pause and set_realtime(True)
        try:
            live = stw.begin(epoch)
            return self._stop_everyone(epoch, t0, live)
        except BaseException:
            self.__exit__(None, None, None)
            raise

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
        waiting = set(live)
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
            # First, while the others are still on their way; all the Ps stopped in this round
            # in one operation, so each lock is taken once for them all.
            self._flush(sorted(confirmed), per_p)
            if not waiting or now > deadline:
                break
            for k in d.serve_light():
                if k in waiting and not stw.fast(k):
                    self._send_stop(k, stop)  # registered or re-bound during the pause
            time.sleep(pause)
            pause = min(pause * 2, 200e-6)
        for k in list(per_p):
            if per_p[k]["state"] == "dead":
                try:
                    arena.reclaim(k, arena.daemon_actor)
                    d.routes.pop(k, None)
                except ShmallocError:
                    per_p[k]["state"] = "late"
        late = sorted(k for k, v in per_p.items() if v["state"] == "late")
        parked = sorted(k for k, v in per_p.items() if v["state"] in ("parked", "stopped"))
        self.world.update(parked=parked, late=late, per_p=per_p, park_ns=time.perf_counter_ns() - t0)
        if late:
            event(
                logging.WARNING,
                "Ps did not park before the deadline",
                epoch=epoch,
                late=late,
                deadline_ms=self.deadline_ms,
            )
        return self.world

    def _flush(self, ks, per_p):
        """Flush the caches of the stopped Ps `ks` now (Go: flushmcache).  Their spans go back to
        the central lists while other Ps may still run: every change they make is an operation
        under the same locks, and nothing is read before every P is stopped and flushed."""
        if not ks:
            return
        arena, w = self.d.arena, self.world
        t = time.perf_counter_ns()
        done = arena.flush_slots(ks, arena.daemon_actor, keep_empty=True, disown=False)
        for k in ks:
            per_p[k].update(cached_spans=done[k][0], listed_returned=done[k][1])
            w["flushed"].add(k)
            arena.q[L.HDR["flush_count"]] += 1
        w["flush_ns"] += time.perf_counter_ns() - t

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
        pause_ns = self.d.stw.end(w.get("flushed", ())) - w["t0"]
        if self.realtime:
            set_realtime(False)
        w["meta"] = {
            "consistent": not w["late"],
            "epoch": w["epoch"],
            "pause_ns": pause_ns,
            "park_ns": w["park_ns"],
            "flush_ns": w["flush_ns"],
            "num_p": sum(1 for v in w["per_p"].values() if v["state"] in ("parked", "stopped", "late")),
            "unflushed": w["late"],
            "per_p": [w["per_p"][k] for k in sorted(w["per_p"])],
            "taken_ns": time.time_ns(),
            "stop_protocol": self.d.stw.protocol,
        }
        return False
