"""The snapshot pause (stop the world, flush every cache, read, resume) against what the workers
are doing and how many there are, at a realistic snapshot rate; and what one alloc call pays when
it meets a snapshot.

    python bench/bench_snapshot.py [--workers 1,2,4,8] [--behaviours tight,compute,numpy,sleep,idle]
                                   [--snapshots 100] [--rate 20] [--latency-seconds 20]
                                   [--cooperative | --compare] [--quick]
                                   [--sizes 16,64,200,1000,5000,40000] [--live 8] [--daemon-nice 0]
                                   [--no-ragged-flush]

A private daemon (`--max-heap 512M`, its own temp dir, endpoint and arena name) and a pool of
worker processes (multiprocessing, spawn), started once per stop protocol.  For each cell
(behaviour x number of workers) that many pool processes connect a Heap of their own
(client.connect), allocate --live (default 8) live blocks of each of --sizes (so that every
cache holds spans: 6 small ones and 8 large ones by default), start their behaviour, and say so; after a short settling time this process -- an observer that holds no P --
takes --snapshots snapshots (client.stats), one every 1/--rate s (default 20 a second: it sleeps
about 50 ms between two), then the workers stop, free their blocks and close their Heaps.

Behaviours (what each worker does between and around its allocator calls):
  tight    alloc/free loops: a 64 B pair, then six more pairs that each replace one of 48 live
           blocks by a new one of the next size of 16, 64, 200, 1000, 5000, 40000 B (40000 is a
           large span, from the P's large-span cache); nothing is written or verified
  compute  pure Python (a sum of squares over range(3000), about 0.3 ms) between two such pairs
  numpy    numpy between two pairs, the GIL released: `a @ b` on 200x200 float64 arrays, then
           np.sort of 100 000 float64, alternately (about 0.7 ms each); BLAS threads are limited
           to --blas-threads (default 1) in the workers; the row is skipped, saying why, when numpy
           cannot be imported
  sleep    one such pair, then time.sleep(0.01)
  idle     connected, never calls the allocator: time.sleep(0.02) in a loop (the first snapshot
           of the cell flushes the spans its live blocks came from; the later ones find the cache
           empty)
  spin     (not in the default list) connected, never calls the allocator, pure Python nonstop

Per cell: median, p99 and max of the daemon's `pause_ns` (from the stop request to the moment the
stop words clear), the p99 of `ragged_stop_max_ns` (the longest any one P was stopped alone in
the ragged round before the pause, its own flush included: what a P pays besides the pause;
--no-ragged-flush starts the daemon without that round), the medians of its parts `park_ns`
(until every P was stopped; the stopped Ps' caches are flushed before it ends, once no P still
awaited is inside a call, so this includes the flushes) and `flush_ns`, how many snapshots ran,
how many came back `consistent: false`, and the workers' allocations per second.  Every
snapshot's `stop_protocol` is checked against the protocol asked for.  With 100 snapshots a
cell, p99 is the second largest pause (nearest rank): run with more --snapshots for a firmer tail.
Snapshots slower than --slow-ms (default 1 ms) are listed afterwards with the state of every P
in them ("stopped": stopped from the daemon's side, outside any call; "parked": the P parked
itself at its next call, having been caught inside one or stopped cooperatively; "late": did not
stop before the deadline) and when each stopped, by the daemon's clock.  A second table says, per
cell, the states the Ps were stopped in, the spans flushed per P in the pause, when the last P
was stopped, the ragged round's length and how many Ps it flushed, and
the daemon main thread's CPU time, run-queue wait and preemptions per snapshot (/proc): whether a
slow pause waited for a P, for the flush, or for a CPU.  --daemon-nice -10 (root) starts the
daemon ahead of the workers, to tell the last apart.

Single alloc call: ONE worker times every alloc(64)+free pair with time.perf_counter_ns for
--latency-seconds (default 20), split into rounds of about 2.5 s that alternate between "this
observer takes snapshots at --rate" and "no snapshots at all" (the baseline of the same run).
Prints p50, p99, p99.9, p99.99 and max per pair, how many pairs took over 0.1 ms and over 1 ms,
and the latency of the pairs during which the P parked for a snapshot (Heap.parks moved).

Protocols: by default the daemon and the workers use the membarrier protocol (the worker processes
get SHMALLOC_NO_MEMBARRIER removed from their environment).  --cooperative starts the daemon and
the workers with SHMALLOC_NO_MEMBARRIER=1 (the cooperative protocol: every P parks itself, woken
by a STOP message when it is outside the allocator); --compare runs both, one after the other,
and prints both sets of tables.

Prints markdown (the command line, nproc, the Python version, the protocol, the tables) on
stdout, progress on stderr.  Every process this run starts and its arena in /dev/shm are removed
on the way out, on an error, Ctrl-C or SIGTERM too.  The default run takes about 2.5 minutes
(4.5 with --compare); --quick (1 and 8 workers, 20 snapshots a cell, 4 s of latency) about 20 s.  The machines are shared and noisy: compare the rows of one run.
"""

import argparse
import collections
import importlib.util
import math
import multiprocessing as mp
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import cpu_model, git_revision, md_table, pct, recv_from, start_daemon, stop_pool  # noqa: E402 - beside this script

MIXED = (16, 64, 200, 1000, 5000, 40000)
LIVE_PER_SIZE = 8
BEHAVIOURS = ("tight", "compute", "numpy", "sleep", "idle", "spin")
DEFAULT_BEHAVIOURS = "tight,compute,numpy,sleep,idle"
NO_MEMBARRIER = "SHMALLOC_NO_MEMBARRIER"
BLAS_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
SETTLE_S = 0.3  # after every worker of a cell said it runs, before the first snapshot


# ---------------------------------------------------------------------------------------------
# the worker processes


def worker_main(conn, cooperative, blas_threads, sizes, live_per_size):
    """A pool process: runs the commands of the parent, one at a time, until "quit" or EOF."""
    global MIXED, LIVE_PER_SIZE
    MIXED, LIVE_PER_SIZE = tuple(sizes), live_per_size
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent alone handles it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if cooperative:
        os.environ[NO_MEMBARRIER] = "1"
    else:
        os.environ.pop(NO_MEMBARRIER, None)
    for var in BLAS_VARS:
        os.environ[var] = str(blas_threads)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        try:
            if msg[0] == "quit":
                return
            if msg[0] == "run":
                conn.send(("done", run_behaviour(conn, *msg[1:])))
            elif msg[0] == "latency":
                conn.send(("done", run_latency(conn, *msg[1:])))
            else:
                conn.send(("error", f"unknown command {msg[0]!r}"))
        except (EOFError, BrokenPipeError):
            return
        except Exception:  # noqa: BLE001 - reported to the parent
            try:
                conn.send(("error", traceback.format_exc()))
            except OSError:
                return


def _live_blocks(alloc):
    """LIVE_PER_SIZE blocks of each size of MIXED, the sizes interleaved."""
    return [alloc(MIXED[i % len(MIXED)]) for i in range(len(MIXED) * LIVE_PER_SIZE)]


def run_behaviour(conn, endpoint, behaviour):
    """Connect, run `behaviour` until the parent says "stop", close.  Sends ("ready", info) once
    the behaviour runs; returns what it did."""
    import client

    np = None
    if behaviour == "numpy":
        try:
            import numpy as np
        except ImportError as e:
            conn.send(("skip", f"numpy cannot be imported: {e}"))
            conn.recv()  # "stop"
            return {"ops": 0, "seconds": 0.0, "units": 0}
    poll, pc, sleep = conn.poll, time.perf_counter, time.sleep
    with client.connect(endpoint) as heap:
        alloc, free = heap.alloc, heap.free
        live = _live_blocks(alloc)
        sizes = [MIXED[i % len(MIXED)] for i in range(len(live))]  # live[i] is replaced by one of sizes[i]
        if not live:  # --live 0: nothing stays allocated, each pair frees what it took
            live, sizes = [alloc(s) for s in MIXED], list(MIXED)
        nl = len(live)
        nmix = len(MIXED)
        ops = units = 0
        j = 0
        if np is not None:
            rng = np.random.default_rng(1)
            a, b = rng.random((200, 200)), rng.random((200, 200))
            x = rng.random(100_000)
            a @ b
            np.sort(x)
        conn.send(("ready", {"slot": heap.slot, "barrier": bool(heap.barrier), "pid": os.getpid()}))
        t0 = pc()
        if behaviour == "tight":
            while not poll():
                for _ in range(64):
                    free(alloc(64))
                    for _ in range(nmix):
                        old = live[j]
                        live[j] = alloc(sizes[j])
                        free(old)
                        j = (j + 1) % nl
                ops += 64 * (1 + nmix)
        elif behaviour == "compute":
            while not poll():
                s = 0
                for i in range(3000):
                    s += i * i
                old = live[j]
                live[j] = alloc(sizes[j])
                free(old)
                j = (j + 1) % nl
                ops += 1
                units += 1
        elif behaviour == "numpy":
            while not poll():
                c = a @ b if units & 1 else np.sort(x)
                del c
                old = live[j]
                live[j] = alloc(sizes[j])
                free(old)
                j = (j + 1) % nl
                ops += 1
                units += 1
        elif behaviour == "sleep":
            while not poll():
                old = live[j]
                live[j] = alloc(sizes[j])
                free(old)
                j = (j + 1) % nl
                ops += 1
                sleep(0.01)
        elif behaviour == "idle":
            while not poll():
                sleep(0.02)
        elif behaviour == "spin":
            while not poll():
                s = 0
                for i in range(3000):
                    s += i * i
                units += 1
        else:
            raise ValueError(f"unknown behaviour {behaviour!r}")
        seconds = pc() - t0
        conn.recv()  # "stop"
        for blk in live:
            free(blk)
    return {"ops": ops, "seconds": seconds, "units": units}


def _summary(durations):
    """Percentiles (nearest rank) of a sequence of ns, via a histogram of distinct values."""
    n = len(durations)
    if not n:
        return None
    hist = sorted(collections.Counter(durations).items())
    want = {"p50": 0.5, "p99": 0.99, "p99.9": 0.999, "p99.99": 0.9999}
    ranks = {k: max(1, math.ceil(p * n)) for k, p in want.items()}
    out, seen = {}, 0
    for value, count in hist:
        seen += count
        for k, r in ranks.items():
            if k not in out and seen >= r:
                out[k] = value
    out["n"] = n
    out["max"] = hist[-1][0]
    out["over_100us"] = sum(c for v, c in hist if v > 100_000)
    out["over_1ms"] = sum(c for v, c in hist if v > 1_000_000)
    top, left = [], 10
    for v, c in reversed(hist):
        top += [v] * min(c, left)
        left -= min(c, left)
        if not left:
            break
    out["top"] = top
    return out


def run_latency(conn, endpoint):
    """Time every alloc(64)+free pair; the parent names the phase ("snap" or "base") the pairs
    belong to, and ends the run with "end".  Returns each phase's summary."""
    from array import array

    import client

    pc = time.perf_counter_ns
    arrays = {"snap": array("q"), "base": array("q")}
    parked = {"snap": [], "base": []}  # the pairs during which the P parked for a snapshot
    parks = {"snap": 0, "base": 0}  # how often it parked, in all
    phase, p0 = None, 0
    with client.connect(endpoint) as heap:
        alloc, free = heap.alloc, heap.free
        live = _live_blocks(alloc)
        for _ in range(10_000):
            free(alloc(64))
        conn.send(("ready", {"slot": heap.slot, "barrier": bool(heap.barrier), "pid": os.getpid()}))
        rec, seen = None, heap.parks
        while True:
            if rec is None or conn.poll():
                if phase:
                    parks[phase] += heap.parks - p0
                msg = conn.recv()
                if msg[0] == "end":
                    break
                phase, p0 = msg[1], heap.parks
                rec, slow = arrays[phase].append, parked[phase].append
                continue
            for _ in range(2048):
                t = pc()
                free(alloc(64))
                d = pc() - t
                rec(d)
                if d > 10_000 and heap.parks != seen:  # a park takes longer than 10 µs
                    slow(d)
                    seen = heap.parks
        for blk in live:
            free(blk)
    out = {k: _summary(v) for k, v in arrays.items()}
    for k, s in out.items():
        if s:
            s["parks"], s["parked"] = parks[k], sorted(parked[k])
    return out


# ---------------------------------------------------------------------------------------------
# the parent: daemon, pool, cleanup


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Session:
    """A daemon in a temp dir and a pool of worker processes, for one stop protocol; close()
    removes all of it (workers, daemon, its arena, the temp dir) whatever happened."""

    def __init__(
        self,
        cooperative,
        pool_size,
        blas_threads,
        sizes,
        live_per_size,
        daemon_nice=0,
        max_heap="512M",
        daemon_args=(),
    ):
        self.cooperative = cooperative
        self.tmp = tempfile.mkdtemp(prefix="shmalloc-bench-snap-")
        self.endpoint = f"ipc://{self.tmp}/control.sock"
        self.arena = f"shmalloc-bench-snap-{os.getpid()}-{'c' if cooperative else 'm'}"
        self.daemon = None
        self.pool = []  # (Process, Connection)
        try:
            self._start_daemon(max_heap, daemon_nice, daemon_args)
            ctx = mp.get_context("spawn")
            for _ in range(pool_size):
                parent, child = ctx.Pipe()
                p = ctx.Process(
                    target=worker_main,
                    args=(child, cooperative, blas_threads, sizes, live_per_size),
                    daemon=True,
                )
                p.start()
                child.close()
                self.pool.append((p, parent))
        except BaseException:
            self.close()
            raise

    def _start_daemon(self, max_heap, nice, extra):
        env = dict(os.environ)
        if self.cooperative:
            env[NO_MEMBARRIER] = "1"
        else:
            env.pop(NO_MEMBARRIER, None)
        self.daemon = start_daemon(
            self.endpoint,
            max_heap,
            os.path.join(self.tmp, "daemon.log"),
            ("--name", self.arena, *extra),
            env=env,
            preexec_fn=(lambda: os.nice(nice)) if nice else None,
        )

    def daemon_sched(self):
        """(ns on a CPU, ns runnable but waiting for one, involuntary context switches) of the
        daemon's main thread -- the one that stops the world -- so far; None if unreadable."""
        pid = self.daemon.pid
        try:
            with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
                run, wait, _ = (int(x) for x in f.read().split())
            with open(f"/proc/{pid}/task/{pid}/status") as f:
                invol = next(
                    int(line.split()[1]) for line in f if line.startswith("nonvoluntary_ctxt_switches")
                )
        except (OSError, ValueError, StopIteration):
            return None
        return run, wait, invol

    def daemon_log(self, tail=3000):
        try:
            with open(os.path.join(self.tmp, "daemon.log"), errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def close(self):
        stop_pool(self.pool)
        self.pool = []
        if self.daemon is not None:
            if self.daemon.poll() is None:
                self.daemon.terminate()  # SIGTERM: a last snapshot, then it unlinks its arena
                try:
                    self.daemon.wait(30)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait(10)
            self.daemon = None
        path = f"/dev/shm/{self.arena}"
        if os.path.exists(path):
            try:
                os.unlink(path)
                print(f"cleanup: removed {path} (the daemon did not)", file=sys.stderr)
            except OSError as e:
                print(f"cleanup: could not remove {path}: {e}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _recv(conn, proc, timeout=120):
    return recv_from(conn, proc, timeout)


# ---------------------------------------------------------------------------------------------
# snapshots


def _keep(snap):
    """What this benchmark keeps of a snapshot."""
    return {
        "pause": snap["pause_ns"],
        "park": snap["park_ns"],
        "flush": snap["flush_ns"],
        "ragged": snap.get("ragged_ns", 0),
        "ragged_n": snap.get("ragged_flushed", 0),
        "ragged_stop": snap.get("ragged_stop_max_ns", 0),
        "consistent": bool(snap["consistent"]),
        "num_p": snap["num_p"],
        "protocol": snap.get("stop_protocol", "?"),
        "unflushed": list(snap.get("unflushed") or ()),
        "per_p": [
            (p.get("slot"), p.get("state", "?"), p.get("park_ns", 0), p.get("cached_spans", 0))
            for p in snap.get("per_p") or ()
        ],
    }


def take_snapshots(endpoint, rate, deadline_ms, count=None, until=None):
    """Snapshots at `rate` a second (one every 1/rate s, no catching up after a slow one), until
    `count` were taken or the monotonic clock passes `until`."""
    import client

    period = 1.0 / rate
    out = []
    nxt = time.monotonic()
    while (count is None or len(out) < count) and (until is None or time.monotonic() < until):
        now = time.monotonic()
        if nxt > now:
            time.sleep(nxt - now)
        out.append(_keep(client.stats(endpoint, deadline_ms=deadline_ms)))
        nxt = max(nxt + period, time.monotonic())
    return out


def med(xs):
    return pct(xs, 0.5)


# ---------------------------------------------------------------------------------------------
# cells


def run_cell(sess, behaviour, n, args, log):
    workers = sess.pool[:n]
    for _, conn in workers:
        conn.send(("run", sess.endpoint, behaviour))
    infos, skip, snaps, wall, sched = [], None, [], 0.0, None
    try:
        for p, conn in workers:
            msg = _recv(conn, p)
            if msg[0] == "skip":
                skip = msg[1]
            else:
                infos.append(msg[1])
        if not skip:
            time.sleep(SETTLE_S)
            t0, s0 = time.monotonic(), sess.daemon_sched()
            snaps = take_snapshots(sess.endpoint, args.rate, args.deadline_ms, count=args.snapshots)
            wall, s1 = time.monotonic() - t0, sess.daemon_sched()
            if s0 and s1:
                sched = tuple((b - a) / len(snaps) for a, b in zip(s0, s1))
    finally:
        for _, conn in workers:
            try:
                conn.send(("stop",))
            except OSError:
                pass
    results = [_recv(conn, p)[1] for p, conn in workers]
    if skip:
        log(f"  {behaviour:8s} {n} worker(s): skipped: {skip}")
        return {"skip": skip}
    ops_rate = sum(r["ops"] / r["seconds"] for r in results if r["seconds"] > 0)
    cell = {
        "behaviour": behaviour,
        "n": n,
        "snaps": snaps,
        "wall": wall,
        "ops_rate": ops_rate,
        "sched": sched,
        "barrier": [i["barrier"] for i in infos],
        "slots": [i["slot"] for i in infos],
    }
    pauses = [s["pause"] for s in snaps]
    log(
        f"  {behaviour:8s} {n} worker(s): {len(snaps)} snapshots in {wall:.1f} s, pause median "
        f"{med(pauses) / 1e6:.3f} ms, p99 {pct(pauses, 0.99) / 1e6:.3f} ms, max {max(pauses) / 1e6:.3f} ms, "
        f"inconsistent {sum(not s['consistent'] for s in snaps)}"
    )
    return cell


def run_latency_cell(sess, args, log):
    p, conn = sess.pool[0]
    conn.send(("latency", sess.endpoint))
    info = _recv(conn, p)[1]
    rounds = max(1, round(args.latency_seconds / (2 * args.latency_round)))
    half = args.latency_seconds / (2 * rounds)
    snaps = []
    try:
        for r in range(rounds):
            # Alternate which phase goes first, so that neither always follows the other.
            for phase in ("snap", "base") if r % 2 == 0 else ("base", "snap"):
                conn.send(("phase", phase))
                until = time.monotonic() + half
                if phase == "snap":
                    snaps += take_snapshots(sess.endpoint, args.rate, args.deadline_ms, until=until)
                else:
                    time.sleep(max(0.0, until - time.monotonic()))
    finally:
        try:
            conn.send(("end",))
        except OSError:
            pass
    res = _recv(conn, p, timeout=300)[1]
    log(f"  latency: {rounds} round(s) of {half:.1f} s + {half:.1f} s, {len(snaps)} snapshots")
    return {
        "snap": res["snap"],
        "base": res["base"],
        "snaps": snaps,
        "barrier": info["barrier"],
        "rounds": rounds,
        "half": half,
    }


def run_protocol(cooperative, args, log):
    name = "cooperative" if cooperative else "membarrier"
    log(f"{name}: starting the daemon and {max(args.workers)} worker processes")
    sess = Session(
        cooperative,
        max(args.workers),
        args.blas_threads,
        args.sizes,
        args.live,
        args.daemon_nice,
        daemon_args=("--no-ragged-flush",) if args.no_ragged_flush else (),
    )
    try:
        cells = []
        for b in args.behaviours:
            for n in args.workers:
                c = run_cell(sess, b, n, args, log)
                c.setdefault("behaviour", b)
                c.setdefault("n", n)
                cells.append(c)
        lat = run_latency_cell(sess, args, log) if args.latency_seconds > 0 else None
        warnings = [
            line for line in sess.daemon_log(20000).splitlines() if " warning " in line or " error " in line
        ]
    finally:
        sess.close()
    return {"name": name, "asked": name, "cells": cells, "latency": lat, "daemon_warnings": warnings}


# ---------------------------------------------------------------------------------------------
# output


def ms(ns, digits=3):
    return "–" if ns is None else f"{ns / 1e6:.{digits}f}"


def us(ns):
    return "–" if ns is None else f"{ns / 1e3:,.1f}".replace(",", " ")


def protocols_seen(run):
    seen = collections.Counter()
    for c in run["cells"]:
        for s in c.get("snaps", ()):
            seen[s["protocol"]] += 1
    if run["latency"]:
        for s in run["latency"]["snaps"]:
            seen[s["protocol"]] += 1
    return seen


def states_text(counter):
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: -kv[1])) or "–"


def report(run, args, out):
    name = run["name"]
    seen = protocols_seen(run)
    barrier = [b for c in run["cells"] for b in c.get("barrier", ())]
    wrong = sum(v for k, v in seen.items() if k != name)
    out(f"#### Stop protocol: {name}")
    out("")
    out(
        f"- daemon's `stop_protocol`: {states_text(seen)} (snapshots)"
        + (f" -- **{wrong} snapshot(s) not {name}**" if wrong else f" -- every snapshot says {name!r}")
    )
    out(f"- workers registered for membarrier: {sum(barrier)} of {len(barrier)} connections")
    out("")
    rows = []
    verdict = {}
    for c in run["cells"]:
        if "skip" in c:
            rows.append([c["behaviour"], c["n"], f"skipped: {c['skip']}", "", "", "", "", "", "", "", ""])
            continue
        snaps = c["snaps"]
        pauses = [s["pause"] for s in snaps]
        p99 = pct(pauses, 0.99)
        alone = pct([s["ragged_stop"] for s in snaps], 0.99)
        verdict.setdefault(c["behaviour"], []).append((c["n"], p99, alone))
        bad = sum(not s["consistent"] for s in snaps)
        rows.append(
            [
                c["behaviour"],
                c["n"],
                ms(med(pauses)),
                ms(p99),
                ms(max(pauses)),
                ms(alone),
                ms(med([s["park"] for s in snaps])),
                ms(med([s["flush"] for s in snaps])),
                len(snaps),
                f"**{bad}**" if bad else 0,
                f"{c['ops_rate']:,.0f}".replace(",", " "),
            ]
        )
    out(
        md_table(
            [
                "behaviour",
                "workers",
                "pause median ms",
                "p99 ms",
                "max ms",
                "one P alone p99 ms",
                "park median ms",
                "flush median ms",
                "snapshots",
                "inconsistent",
                "worker allocs/s",
            ],
            rows,
        )
    )
    out("")
    rows = []
    for c in run["cells"]:
        if "skip" in c:
            continue
        snaps = c["snaps"]
        states = collections.Counter(st for s in snaps for _, st, _, _ in s["per_p"])
        spans = [sp for s in snaps for _, _, _, sp in s["per_p"]]
        last = [max((at for _, _, at, _ in s["per_p"]), default=0) for s in snaps]
        sched = c.get("sched")
        rows.append(
            [
                c["behaviour"],
                c["n"],
                states_text(states),
                f"{sum(spans) / max(1, len(spans)):.1f}",
                ms(med(last)),
                ms(pct(last, 0.99)),
                ms(med([s["ragged"] for s in snaps])),
                f"{statistics.mean(s['ragged_n'] for s in snaps) / c['n']:.2f}",
                ms(sched[0]) if sched else "–",
                ms(sched[1]) if sched else "–",
                f"{sched[2]:.2f}" if sched else "–",
            ]
        )
    out(
        "Where the pause goes: the states the Ps were stopped in (all snapshots of the cell), the spans "
        "flushed per P, when the last P was stopped (by the daemon's clock), and per snapshot the CPU "
        "time of the daemon's main thread, its time runnable but waiting for a CPU, and how often it "
        "was preempted (from /proc; these include handling the request around the pause)."
    )
    out("")
    out(
        md_table(
            [
                "behaviour",
                "workers",
                "P states",
                "spans/P",
                "last P stopped median ms",
                "p99 ms",
                "ragged round median ms",
                "flushed in it, per P",
                "daemon CPU ms",
                "daemon run-queue wait ms",
                "daemon preempted",
            ],
            rows,
        )
    )
    out("")
    for b, cells in verdict.items():
        worst = max(cells, key=lambda t: t[1])
        over = [f"{n} workers {p / 1e6:.2f} ms" for n, p, _ in cells if p > 1_000_000]
        out(
            f"- {b}: worst p99 {worst[1] / 1e6:.3f} ms ({worst[0]} workers): target p99 <= 1 ms "
            + ("met" if not over else "NOT met (" + ", ".join(over) + ")")
            + f"; a P stopped alone in the ragged round: worst p99 {max(a for _, _, a in cells) / 1e6:.3f} ms"
        )
    out("")

    lat = run["latency"]
    if lat:
        lp = [s["pause"] for s in lat["snaps"]]
        out(
            f"Single alloc call: 1 worker, alloc(64)+free pairs each timed with perf_counter_ns; "
            f"{lat['rounds']} round(s) of {lat['half']:.1f} s with snapshots at {args.rate:g}/s and "
            f"{lat['half']:.1f} s without, alternating ({len(lp)} snapshots: pause median {ms(med(lp))} ms, "
            f"p99 {ms(pct(lp, 0.99))} ms, max {ms(max(lp) if lp else None)} ms, inconsistent "
            f"{sum(not s['consistent'] for s in lat['snaps'])})."
        )
        out("")
        rows = []
        for key, label in (("snap", f"snapshots at {args.rate:g}/s"), ("base", "no snapshots (baseline)")):
            s = lat[key]
            if not s:
                rows.append([label, 0, "–", "–", "–", "–", "–", "–", "–"])
                continue
            rows.append(
                [
                    label,
                    f"{s['n']:,}".replace(",", " "),
                    us(s["p50"]),
                    us(s["p99"]),
                    us(s["p99.9"]),
                    us(s["p99.99"]),
                    us(s["max"]),
                    s["over_100us"],
                    s["over_1ms"],
                ]
            )
        out(
            md_table(
                [
                    "pairs timed",
                    "pairs",
                    "p50 µs",
                    "p99 µs",
                    "p99.9 µs",
                    "p99.99 µs",
                    "max µs",
                    "> 0.1 ms",
                    "> 1 ms",
                ],
                rows,
            )
        )
        out("")
        s = lat["snap"]
        if s:
            out(
                f"- p99.9 with snapshots {s['p99.9'] / 1e3:.1f} µs: target <= 2 ms "
                + ("met" if s["p99.9"] <= 2_000_000 else "NOT met")
            )
            out(f"- the 10 slowest pairs with snapshots (µs): {', '.join(us(v) for v in s['top'])}")
        if lat["base"]:
            out(f"- the 10 slowest pairs without (µs): {', '.join(us(v) for v in lat['base']['top'])}")
        if s:
            pk = s["parked"]
            out(
                f"- the worker parked {s['parks']} times in {len(lp)} snapshots (the others stopped it "
                f"between two calls: it paid a resync and refill at its next call instead); the pairs that "
                f"parked: {len(pk)}, median {us(med(pk))} µs, p99 {us(pct(pk, 0.99))} µs, max "
                f"{us(max(pk) if pk else None)} µs"
            )
        out("")

    # The slow snapshots, and the states of the Ps in them.
    slow_ns = args.slow_ms * 1e6
    lines = []
    for c in run["cells"] + ([{"behaviour": "latency", "n": 1, "snaps": lat["snaps"]}] if lat else []):
        snaps = c.get("snaps") or []
        slow = [s for s in snaps if s["pause"] > slow_ns]
        if not slow and all(s["consistent"] for s in snaps):
            continue
        every = collections.Counter(st for s in snaps for _, st, _, _ in s["per_p"])
        in_slow = collections.Counter(st for s in slow for _, st, _, _ in s["per_p"])
        lines.append(
            f"- {c['behaviour']}, {c['n']} worker(s): {len(slow)} of {len(snaps)} snapshots over "
            f"{args.slow_ms:g} ms; P states in them: {states_text(in_slow)} (in every snapshot of "
            f"the cell: {states_text(every)})"
        )
        for s in sorted(slow, key=lambda s: -s["pause"])[:3]:
            ps = ", ".join(
                f"{st} {at / 1e6:.2f} ({sp})" for _, st, at, sp in sorted(s["per_p"], key=lambda t: t[2])
            )
            lines.append(
                f"  - pause {ms(s['pause'])} ms (park {ms(s['park'])}, flush {ms(s['flush'])})"
                f"{'' if s['consistent'] else ', INCONSISTENT, unflushed ' + str(s['unflushed'])}; "
                f"each P's state, ms to stop (spans flushed): {ps}"
            )
    if lines:
        out(f"Snapshots slower than {args.slow_ms:g} ms (or inconsistent), the three slowest of each cell:")
        out("")
        out("\n".join(lines))
        out("")
    if run["daemon_warnings"]:
        out(f"Daemon log warnings/errors ({len(run['daemon_warnings'])}):")
        out("")
        out("```")
        out("\n".join(run["daemon_warnings"][-10:]))
        out("```")
        out("")


def header(args, out, load0):
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    cpu, rev = cpu_model(), git_revision()
    try:
        dirty = [
            line[3:]
            for line in subprocess.run(
                ["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.splitlines()
            if not line[3:].startswith("bench/")
        ]
    except (OSError, subprocess.SubprocessError):
        dirty = []
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    out("### Snapshot pause")
    out("")
    out("```sh")
    out(cmd)
    out("```")
    out("")
    out(
        f"nproc {cpus}, {cpu or platform.machine()}, Python {platform.python_version()} "
        f"({platform.python_implementation()}), {platform.system()} {platform.release()}; code {rev or '?'}"
        f"{' (uncommitted: ' + ', '.join(dirty) + ')' if dirty else ''}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; load average {load0:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    )
    out(
        f"workers {','.join(map(str, args.workers))}; behaviours {','.join(args.behaviours)}; "
        f"{args.snapshots} snapshots a cell at {args.rate:g}/s; deadline {args.deadline_ms} ms; "
        f"BLAS threads per worker {args.blas_threads}; sizes {','.join(map(str, args.sizes))} B with "
        f"{args.live} live blocks of each; daemon nice {args.daemon_nice:+d}"
    )
    out("")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default=None, help="worker counts (default 1,2,4,8; --quick 1,8)")
    ap.add_argument(
        "--behaviours",
        default=DEFAULT_BEHAVIOURS,
        help=f"comma-separated, of {','.join(BEHAVIOURS)} (default {DEFAULT_BEHAVIOURS})",
    )
    ap.add_argument("--snapshots", type=int, default=None, help="snapshots a cell (default 100; --quick 20)")
    ap.add_argument("--rate", type=float, default=20.0, help="snapshots a second (default 20)")
    ap.add_argument("--deadline-ms", type=int, default=2000, help="each snapshot's park deadline")
    ap.add_argument(
        "--latency-seconds",
        type=float,
        default=None,
        help="length of the single-alloc-call run, half of it with snapshots "
        "(default 20; --quick 4; 0 skips it)",
    )
    ap.add_argument(
        "--latency-round",
        type=float,
        default=2.5,
        help="seconds of each phase of the single-alloc-call run (default 2.5)",
    )
    ap.add_argument("--slow-ms", type=float, default=1.0, help="list snapshots slower than this (default 1)")
    ap.add_argument(
        "--sizes",
        default=",".join(map(str, MIXED)),
        help="the sizes the workers rotate through, besides the 64 B pair (default "
        f"{','.join(map(str, MIXED))}; over 32768 is a large span)",
    )
    ap.add_argument(
        "--live",
        type=int,
        default=LIVE_PER_SIZE,
        help=f"live blocks a worker keeps of each size (default {LIVE_PER_SIZE})",
    )
    ap.add_argument(
        "--daemon-nice",
        type=int,
        default=0,
        help="start the daemon with this nice increment (negative: a higher priority than "
        "the workers; needs the privilege); default 0, the workers' priority",
    )
    ap.add_argument(
        "--no-ragged-flush",
        action="store_true",
        help="start the daemon with --no-ragged-flush (every cache flushed inside the pause)",
    )
    ap.add_argument("--blas-threads", type=int, default=1, help="BLAS/OpenMP threads per worker (default 1)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument(
        "--cooperative",
        action="store_true",
        help=f"the daemon and workers run with {NO_MEMBARRIER}=1 (the cooperative protocol)",
    )
    g.add_argument("--compare", action="store_true", help="run membarrier, then cooperative; print both")
    ap.add_argument("--quick", action="store_true", help="a smoke run of about 20 s")
    args = ap.parse_args(argv)
    args.workers = [int(x) for x in (args.workers or ("1,8" if args.quick else "1,2,4,8")).split(",")]
    args.snapshots = args.snapshots if args.snapshots is not None else (20 if args.quick else 100)
    if args.latency_seconds is None:
        args.latency_seconds = 4.0 if args.quick else 20.0
    if args.quick:
        args.latency_round = min(args.latency_round, 1.0)
    args.sizes = [int(x) for x in args.sizes.split(",") if x.strip()]
    args.behaviours = [b.strip() for b in args.behaviours.split(",") if b.strip()]
    for b in args.behaviours:
        if b not in BEHAVIOURS:
            ap.error(f"unknown behaviour {b!r} (choose from {', '.join(BEHAVIOURS)})")
    if min(args.workers) < 1 or args.rate <= 0 or args.snapshots < 1:
        ap.error("--workers, --rate and --snapshots must be positive")
    if "numpy" in args.behaviours and importlib.util.find_spec("numpy") is None:
        print("numpy: not installed, its rows are skipped", file=sys.stderr)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def out(msg):
        print(msg, flush=True)

    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    t0, load0 = time.monotonic(), os.getloadavg()[0]
    try:
        protocols = [False, True] if args.compare else [args.cooperative]
        runs = [run_protocol(c, args, log) for c in protocols]
    except KeyboardInterrupt:
        log("interrupted: every process and the arena were cleaned up")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old_term)
    header(args, out, load0)
    for run in runs:
        report(run, args, out)
    if len(runs) == 2:
        a, b = ({(c["behaviour"], c["n"]): c for c in r["cells"] if "snaps" in c} for r in runs)
        rows = []
        for key, ca in a.items():
            cb = b.get(key)
            if not cb:
                continue
            pa, pb = [s["pause"] for s in ca["snaps"]], [s["pause"] for s in cb["snaps"]]
            rows.append(
                [
                    key[0],
                    key[1],
                    ms(med(pa)),
                    ms(med(pb)),
                    ms(pct(pa, 0.99)),
                    ms(pct(pb, 0.99)),
                    ms(max(pa)),
                    ms(max(pb)),
                ]
            )
        out("#### membarrier vs cooperative (pause ms)")
        out("")
        out(
            md_table(
                [
                    "behaviour",
                    "workers",
                    "median mb",
                    "median coop",
                    "p99 mb",
                    "p99 coop",
                    "max mb",
                    "max coop",
                ],
                rows,
            )
        )
        out("")
    out(f"(whole run: {time.monotonic() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
