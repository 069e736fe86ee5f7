"""What a hostile, unauthenticated client costs, measured: it floods the daemon with hijack,
shutdown, snapshot, long-deadline and garbage requests, over ipc:// and over tcp://; every one
is refused (or coalesced, floored and capped) while a real worker's throughput and the snapshot
pause should stay within 20 % of an undisturbed run.  The tests check the refusals; only a benchmark
can say what the flood costs, since the tests never depend on timing.

    python bench/bench_flood.py [--reps 3] [--seconds 5] [--rate 20] [--cells ...] [--quick]
                                [--refusal-window 64] [--stats-window 16] [--pin]
                                [--daemon-args "--tarpit-ms 0 ..."]

Two private daemons (each its own temp dir, arena name and log; `--max-heap 512M`; no metrics,
so no periodic snapshot; --min-stop-interval-ms, --park-deadline-ms, the refusal budgets and
--tarpit-ms at their defaults: 5, 2000, 200 a second in bursts of 400 per client, 1000 in 2000
for everyone, snapshots 20 a second in bursts of 40 per client, 250): one on an ipc:// socket, one on tcp://127.0.0.1:PORT.  Three long-lived
processes:

  worker    (spawn) per cell: client.connect() to the cell's daemon, 8 live blocks of each of
            16, 64, 200, 1000, 5000, 40000 B, then alloc/free pairs nonstop -- a 64 B pair, then
            six pairs that each replace one live block by a new one of the next size (40000 B is
            a large span) -- counting pairs in windows of --window seconds (0.25); closes its
            Heap at the end of the cell.  Its ops/s for a cell is the median window.
  observer  this process: client.stats() at --rate a second (20: one every 50 ms), recording
            each snapshot's pause_ns, epoch, consistent and num_p, and the reply's latency.
  attacker  (spawn) per flood cell: two DEALER sockets of its own, no token, no arena mapped,
            sending pipelined requests as fast as the replies come back (--refusal-window
            requests in flight on one, --stats-window on the other), each reply counted by its
            error code against the code expected:
              hijacks     heartbeat / register / unregister for the worker's slot without its
                          token or with a wrong one (FORBIDDEN), heartbeat for the slot and
                          register for it naming the attacker's own pid (NOT_REGISTERED)
              deadline    stats with deadline_ms 60000 (BAD_ARGS: over the wire's bound 10000)
              garbage     a frame that is not msgpack (BAD_FRAME), an op nobody knows
                          (UNKNOWN_OP), a request of another protocol version (BAD_VERSION)
              admin       tcp:// only: shutdown, release, check without a token (FORBIDDEN),
                          shutdown with a wrong one (FORBIDDEN).  Over ipc:// these are served
                          to anyone who can connect (docs/ARCHITECTURE.md, "Who may do what"):
                          they are not sent there -- a shutdown would be obeyed.
              snapshots   stats (deadline 2000) and stats with deadline_ms 10000 (capped at the
                          daemon's --park-deadline-ms) on the second socket: answered, coalesced
                          into one pause per batch, two pauses at least 5 ms apart, and beyond
                          the socket's snapshot budget waiting for a pause someone else asks
                          for (250 ms at most); over tcp:// every pid in them must be 0.

Cells (--cells; each --seconds long after a settling time, alternated round robin -- the order
rotated every rep -- and repeated --reps times):
  ipc:none  tcp:none         undisturbed: the worker and the observer alone (the baselines)
  ipc:flood tcp:flood        the attacker, everything above
  ipc:refusals ipc:stats     diagnostics (default full run, not --quick): the attacker's refusal
                             socket alone, its snapshot socket alone -- which part costs what
--pin (a diagnostic, every cell): the worker alone on the first CPU, the daemons, the attacker
and the observer on the others -- what the flood costs a worker that keeps a CPU of its own,
against what it costs one that must share its CPUs with the flood.
--daemon-args (a diagnostic): more options for both daemons; "--refusal-budget 1e9 1e9
--global-refusal-budget 1e9 1e9" lifts the budgets, so that no refusal is held: what each one
costs the daemon, and what the flood costs without the tarpit.

Prints per cell: the worker's ops/s (median over reps of each rep's median window) and its ratio
to the undisturbed cell of the same transport; the snapshot pause median and p99 (every snapshot
of the cell, reps pooled, nearest rank) and their ratios; stops of the world per second (from the
snapshot epochs: every pause the daemon made, the attacker's included); the attack requests sent
and answered, per kind and error code (summed over reps); the CPU of the daemon, the worker and
the attacker (/proc), the worker's pairs per CPU-second of its own, and the daemon's CPU per
attack request (over the undisturbed cell); every pause of the measured time (the attacker's
snapshots too); the parts of the observer's pauses (park_ns, flush_ns, the rest) and the pause as
the worker felt it (each batch of pairs during which it parked, less a median batch).

Checks, printed and in the exit status (1 if one fails): every attack reply is the one expected
and every request answered; the daemon up after every cell; no slot hijacked (the daemon's log
says "P joined" once per connection of the worker and never "P re-registered"); every observer
snapshot answered and consistent, with the worker's one P.  The targets (0.8 to 1.2 times the
undisturbed throughput; pause median and p99 at most 1.2 times) are printed as met or not; they
do not change the exit status.

Markdown on stdout, progress on stderr.  Every process, socket and /dev/shm segment this run
makes is removed on the way out, on an error, Ctrl-C or SIGTERM too.  The default run takes about
100 s; --quick (1 rep, 2 s cells, no diagnostic cells) about 12 s.  The machines are shared
and noisy, and the flood competes for their CPUs: read the CPU table beside the ratios.
"""

import argparse
import collections
import multiprocessing as mp
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from array import array

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import (  # noqa: E402
    child_init,
    cpu_model,
    fmt_num,
    git_revision,
    md_table,
    pct,
    recv_from,
    start_daemon,
    stop_pool,
)

MIXED = (16, 64, 200, 1000, 5000, 40000)
LIVE_PER_SIZE = 8
SETTLE_S = 0.3  # after the worker (and the attacker) said they run, before the measurement
DRAIN_S = 5.0  # how long the attacker waits for its last replies
MODES = ("none", "flood", "refusals", "stats")
DEFAULT_CELLS = "ipc:none,ipc:flood,tcp:none,tcp:flood,ipc:refusals,ipc:stats"
QUICK_CELLS = "ipc:none,ipc:flood,tcp:none,tcp:flood"


# ---------------------------------------------------------------------------------------------
# the worker


def worker_main(conn, window_s, cpus=None):
    """The worker process: runs ("run", endpoint) commands until ("quit",) or EOF."""
    child_init()
    if cpus:
        os.sched_setaffinity(0, cpus)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "quit":
            return
        try:
            conn.send(("done", run_worker(conn, msg[1], window_s)))
        except (EOFError, BrokenPipeError):
            return
        except Exception:  # noqa: BLE001 - reported to the parent
            try:
                conn.send(("error", traceback.format_exc()))
            except OSError:
                return


def run_worker(conn, endpoint, window_s):
    """Connect, alloc/free pairs of mixed sizes until the parent says "stop", counting pairs per
    window; close.  Sends ("ready", info) once the pairs run."""
    import client

    mono = time.monotonic
    with client.connect(endpoint) as heap:
        alloc, free = heap.alloc, heap.free
        live = [alloc(MIXED[i % len(MIXED)]) for i in range(len(MIXED) * LIVE_PER_SIZE)]
        sizes = [MIXED[i % len(MIXED)] for i in range(len(live))]
        nl, nmix, j = len(live), len(MIXED), 0
        for _ in range(2000):  # warm: every size class cached
            free(alloc(64))
            old = live[j]
            live[j] = alloc(sizes[j])
            free(old)
            j = (j + 1) % nl
        conn.send(("ready", {"slot": heap.slot, "pid": os.getpid()}))
        windows = []  # (start, end, pairs), time.monotonic() (system-wide: the parent's clock)
        batches = array("d")  # every batch's seconds
        stalls = []  # (end, seconds) of the batches during which the P parked
        start = last = mono()
        end, ops, seen = start + window_s, 0, heap.parks
        while True:
            for _ in range(16):
                free(alloc(64))
                for _ in range(nmix):
                    old = live[j]
                    live[j] = alloc(sizes[j])
                    free(old)
                    j = (j + 1) % nl
            ops += 16 * (1 + nmix)
            now = mono()
            batches.append(now - last)
            if heap.parks != seen:
                seen = heap.parks
                stalls.append((now, now - last))
            last = now
            if now >= end:
                windows.append((start, now, ops))
                start, end, ops = now, now + window_s, 0
                if conn.poll():
                    break
        conn.recv()  # "stop"
        parks = heap.parks
        for blk in live:
            free(blk)
    typical = sorted(batches)[len(batches) // 2]
    return {
        "windows": windows,
        "parks": parks,
        "stalls": [(t, d - typical) for t, d in stalls],
        "batch": typical,
    }


# ---------------------------------------------------------------------------------------------
# the attacker


def attack_kinds(slot, wpid, mypid, tcp, mode):
    """[(name, socket, frame, expected code)] of one attack; the request id is the kind's index
    (the frames are encoded once: the attacker spends its time sending)."""
    import msgpack

    from client import protocol

    wrong = random.getrandbits(64) | 1  # 1 chance in 2**63 of being the slot's token
    spec = [
        ("heartbeat slot, no token", "ref", "heartbeat", {"slot": slot}, "FORBIDDEN"),
        ("heartbeat slot+pid, no token", "ref", "heartbeat", {"slot": slot, "pid": wpid}, "FORBIDDEN"),
        (
            "heartbeat slot+pid, wrong token",
            "ref",
            "heartbeat",
            {"slot": slot, "pid": wpid, "token": wrong},
            "FORBIDDEN",
        ),
        (
            "heartbeat slot, attacker's pid",
            "ref",
            "heartbeat",
            {"slot": slot, "pid": mypid},
            "NOT_REGISTERED",
        ),
        ("register worker's pid, no token", "ref", "register", {"pid": wpid}, "FORBIDDEN"),
        (
            "register worker's pid+slot, wrong token",
            "ref",
            "register",
            {"pid": wpid, "slot": slot, "token": wrong},
            "FORBIDDEN",
        ),
        ("register slot, attacker's pid", "ref", "register", {"pid": mypid, "slot": slot}, "NOT_REGISTERED"),
        ("unregister slot, no token", "ref", "unregister", {"slot": slot}, "FORBIDDEN"),
        ("unregister slot, wrong token", "ref", "unregister", {"slot": slot, "token": wrong}, "FORBIDDEN"),
        ("stats deadline_ms 60000", "ref", "stats", None, "BAD_ARGS"),
        ("garbage: not msgpack", "ref", None, b"\xc1shmalloc", "BAD_FRAME"),
        ("garbage: unknown op", "ref", None, {"v": 1, "op": "hijack"}, "UNKNOWN_OP"),
        ("garbage: version 2", "ref", None, {"v": 2, "op": "register", "pid": wpid}, "BAD_VERSION"),
    ]
    if tcp:
        spec += [
            ("shutdown, no token", "ref", "shutdown", {}, "FORBIDDEN"),
            ("release, no token", "ref", "release", {}, "FORBIDDEN"),
            ("check, no token", "ref", "check", {}, "FORBIDDEN"),
            ("shutdown, wrong token", "ref", "shutdown", {"token": wrong}, "FORBIDDEN"),
        ]
    spec += [
        ("stats (coalesced, floored)", "stats", "stats", {}, "OK"),
        ("stats deadline_ms 10000 (capped)", "stats", "stats", {"deadline_ms": 10000}, "OK"),
    ]
    if mode == "refusals":
        spec = [s for s in spec if s[1] == "ref"]
    elif mode == "stats":
        spec = [s for s in spec if s[1] == "stats"]
    kinds = []
    for i, (name, role, op, fields, expected) in enumerate(spec):
        if fields is None:  # out of the wire's bounds: encode_request would refuse to build it
            frame = msgpack.packb({"v": 1, "id": i, "op": op, "deadline_ms": 60000})
        elif op is None:  # garbage: the bytes themselves, or a map no request may be
            frame = fields if isinstance(fields, bytes) else msgpack.packb({**fields, "id": i})
        else:
            frame = protocol.encode_request(op, i, **fields)
        kinds.append((name, role, frame, expected))
    return kinds


def attacker_main(conn):
    """The attacker process: runs ("attack", ...) commands until ("quit",) or EOF."""
    child_init()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "quit":
            return
        try:
            conn.send(("done", run_attack(conn, *msg[1:])))
        except (EOFError, BrokenPipeError):
            return
        except Exception:  # noqa: BLE001 - reported to the parent
            try:
                conn.send(("error", traceback.format_exc()))
            except OSError:
                return


def run_attack(conn, endpoint, slot, wpid, tcp, mode, windows):
    """Flood `endpoint` until the parent says "stop"; returns what was sent and how it was
    answered.  Sends ("flooding", {}) once the first requests are out."""
    import msgpack
    import zmq

    kinds = attack_kinds(slot, wpid, os.getpid(), tcp, mode)
    ctx = zmq.Context()
    socks, order, out = {}, {}, {}
    for role in ("ref", "stats"):
        order[role] = [i for i, k in enumerate(kinds) if k[1] == role]
        if order[role]:
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            socks[role], out[role] = s, 0
    role_of = [k[1] for k in kinds]
    unreadable = next((i for i, k in enumerate(kinds) if k[3] == "BAD_FRAME"), None)
    frames = [k[2] for k in kinds]
    sent = [0] * len(kinds)
    answers = collections.Counter()  # (kind index, code) -> replies
    pids_shown = 0  # stats replies that named a pid (over tcp:// every pid must be 0)
    pauses = {}  # epoch -> (pause_ns, taken_ns) of every snapshot this attacker was answered
    poller = zmq.Poller()
    for s in socks.values():
        poller.register(s, zmq.POLLIN)
    poller.register(conn.fileno(), zmq.POLLIN)
    pos = dict.fromkeys(socks, 0)

    def drain(s):
        nonlocal pids_shown
        while True:
            try:
                frame = s.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            m = msgpack.unpackb(frame)
            k = m.get("id")
            code = "OK" if m.get("ok") else str(m.get("error"))
            if k is None and code == "BAD_FRAME" and unreadable is not None:
                k = unreadable  # the one kind whose id the daemon cannot read
            if not isinstance(k, int) or not 0 <= k < len(kinds):
                answers[(-1, code)] += 1
                continue
            answers[(k, code)] += 1
            out[role_of[k]] -= 1
            if code == "OK":
                snap = m["snapshot"]
                pauses[snap["epoch"]] = (snap["pause_ns"], snap["taken_ns"])
                if tcp and any(p.get("pid") for p in snap["per_p"]):
                    pids_shown += 1

    t0 = time.monotonic()
    told = False
    stop = False
    while not stop:
        for role, s in socks.items():
            ks = order[role]
            while out[role] < windows[role]:
                k = ks[pos[role] % len(ks)]
                pos[role] += 1
                s.send(frames[k], zmq.NOBLOCK)
                sent[k] += 1
                out[role] += 1
        if not told:
            conn.send(("flooding", {"pid": os.getpid()}))
            told = True
        for s, _ in poller.poll(1000):
            if s == conn.fileno():
                stop = True
            else:
                drain(s)
    seconds = time.monotonic() - t0
    deadline = time.monotonic() + DRAIN_S
    while sum(out.values()) and time.monotonic() < deadline:
        for s, _ in poller.poll(100):
            if s != conn.fileno():
                drain(s)
    conn.recv()  # "stop"
    for s in socks.values():
        s.close(0)
    ctx.term()
    return {
        "kinds": [(name, expected) for name, _, _, expected in kinds],
        "sent": sent,
        "answers": dict(answers),
        "unanswered": sum(out.values()),
        "seconds": seconds,
        "pids_shown": pids_shown,
        "pauses": pauses,
    }


# ---------------------------------------------------------------------------------------------
# the parent: daemons, processes, cleanup


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of process `pid` (every thread), in seconds; None if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Daemon:
    """`python -m service daemon` in its own session, its log in `tmp`."""

    def __init__(self, transport, tmp, cpus=None, extra=()):
        self.transport = transport
        self.name = f"shmalloc-bench-flood-{os.getpid()}-{transport}"
        self.endpoint = (
            f"ipc://{tmp}/{transport}/control.sock"
            if transport == "ipc"
            else f"tcp://127.0.0.1:{_free_port()}"
        )
        self.logpath = os.path.join(tmp, f"daemon-{transport}.log")
        self.proc = start_daemon(
            self.endpoint,
            "512M",
            self.logpath,
            ("--name", self.name, *extra),
            # Before exec: every thread the daemon starts inherits it.
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
            ping_ms=300,
        )

    def log(self):
        try:
            with open(self.logpath, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def up(self):
        """The process runs and answers a ping."""
        import client

        if self.proc.poll() is not None:
            return False
        try:
            client.ping(self.endpoint, 3000)
            return True
        except client.DaemonUnavailable:
            return False

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a last snapshot, then it unlinks its arena and socket
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        path = f"/dev/shm/{self.name}"
        if os.path.exists(path):
            try:
                os.unlink(path)
                print(f"cleanup: removed {path} (the daemon did not)", file=sys.stderr)
            except OSError as e:
                print(f"cleanup: could not remove {path}: {e}", file=sys.stderr)


class Session:
    """The daemons, the worker and the attacker; close() removes all of it whatever happened."""

    def __init__(self, transports, window_s, log, pin=None, extra=()):
        # pin: (the worker's CPUs, everyone else's), or None
        self.tmp = tempfile.mkdtemp(prefix="shmalloc-bench-flood-")
        self.daemons = {}
        self.procs = []  # (Process, Connection)
        try:
            for t in transports:
                log(f"starting the {t} daemon")
                self.daemons[t] = Daemon(t, self.tmp, pin and pin[1], extra)
            ctx = mp.get_context("spawn")
            for target, args in ((worker_main, (window_s, pin and pin[0])), (attacker_main, ())):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=target, args=(child, *args), daemon=True)
                p.start()
                child.close()
                self.procs.append((p, parent))
            self.worker, self.attacker = self.procs
        except BaseException:
            self.close()
            raise

    def close(self):
        stop_pool(self.procs)
        self.procs = []
        for d in self.daemons.values():
            d.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def _recv(conn, proc, timeout=60):
    return recv_from(conn, proc, timeout)


# ---------------------------------------------------------------------------------------------
# one cell


def observe(endpoint, rate, until):
    """Snapshots at `rate` a second until `until` (time.monotonic()): one dict per reply, and the
    requests that failed."""
    import client

    period, out, failed = 1.0 / rate, [], []
    nxt = time.monotonic()
    while time.monotonic() < until:
        now = time.monotonic()
        if nxt > now:
            time.sleep(nxt - now)
        t = time.perf_counter_ns()
        try:
            s = client.stats(endpoint, deadline_ms=2000)
        except client.ShmallocError as e:
            failed.append(f"{type(e).__name__}: {e}")
        else:
            out.append(
                {
                    "pause": s["pause_ns"],
                    "epoch": s["epoch"],
                    "taken": s["taken_ns"],
                    "consistent": bool(s["consistent"]),
                    "num_p": s["num_p"],
                    "park": s["park_ns"],
                    "flush": s["flush_ns"],
                    "states": [p.get("state", "?") for p in s["per_p"]],
                    "latency": time.perf_counter_ns() - t,
                }
            )
        nxt = max(nxt + period, time.monotonic())
    return out, failed


def run_cell(sess, cell, args, log):
    transport, mode = cell
    d = sess.daemons[transport]
    wp, wconn = sess.worker
    ap, aconn = sess.attacker
    wconn.send(("run", d.endpoint))
    attack, attacking, worker = None, False, None
    try:
        info = _recv(wconn, wp)[1]
        if mode != "none":
            windows = {"ref": args.refusal_window, "stats": args.stats_window}
            aconn.send(("attack", d.endpoint, info["slot"], info["pid"], transport == "tcp", mode, windows))
            attacking = True
            _recv(aconn, ap)  # "flooding"
        time.sleep(SETTLE_S)
        pids = {"daemon": d.proc.pid, "worker": wp.pid, "attacker": ap.pid}
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        t0, w0 = time.monotonic(), time.time_ns()
        snaps, failed = observe(d.endpoint, args.rate, t0 + args.seconds)
        t1, w1 = time.monotonic(), time.time_ns()
        c1 = {k: cpu_seconds(p) for k, p in pids.items()}
    finally:
        if attacking:
            try:
                aconn.send(("stop",))
                attack = _recv(aconn, ap, timeout=DRAIN_S + 30)[1]
            except (OSError, RuntimeError) as e:
                log(f"  attacker: {e}")
        try:
            wconn.send(("stop",))
            worker = _recv(wconn, wp)[1]
        except OSError:
            pass
    up = d.up()
    rates = [ops / (b - a) for a, b, ops in worker["windows"] if a >= t0 and b <= t1 and b > a]
    cpu = {k: (c1[k] - c0[k]) / (t1 - t0) if c0[k] is not None and c1[k] is not None else None for k in c0}
    pauses = [s["pause"] for s in snaps]
    # Every pause of the measured time: the observer's, and those the attacker was answered.
    every = {s["epoch"]: s["pause"] for s in snaps}
    if attack:
        every.update((e, p) for e, (p, taken) in attack["pauses"].items() if w0 <= taken <= w1)
    stops = None
    if len(snaps) >= 2 and snaps[-1]["taken"] > snaps[0]["taken"]:
        stops = (snaps[-1]["epoch"] - snaps[0]["epoch"]) / ((snaps[-1]["taken"] - snaps[0]["taken"]) / 1e9)
    res = {
        "cell": cell,
        "ops": median(rates),
        "windows": len(rates),
        "snaps": snaps,
        "every": list(every.values()),
        "failed": failed,
        "stops": stops,
        "cpu": cpu,
        "parks": worker["parks"],
        "stalls": [d * 1e9 for t, d in worker["stalls"] if t0 <= t <= t1],
        "attack": attack,
        "up": up,
        "seconds": t1 - t0,
    }
    answered = attack and sum(attack["answers"].values())
    log(
        f"  {transport}:{mode:8s} worker {fmt_num(res['ops'])} ops/s, pause median {ms(median(pauses))} ms "
        f"p99 {ms(pct(pauses, 0.99))} ms, {len(snaps)} snapshots, {stops or 0:.0f} stops/s"
        + (f", attack {fmt_num(answered / attack['seconds'])} replies/s" if attack else "")
        + ("" if up else " -- DAEMON DOWN")
    )
    if not up:
        raise RuntimeError(f"the {transport} daemon is down after {transport}:{mode}:\n{d.log()[-3000:]}")
    return res


# ---------------------------------------------------------------------------------------------
# figures and output


def median(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def ms(ns, digits=3):
    return "–" if ns is None else f"{ns / 1e6:.{digits}f}"


def rt(x):
    return "–" if x is None else f"{x:.2f}"


def div(a, b):
    return a / b if a is not None and b else None


def cell_name(cell):
    return f"{cell[0]}:{cell[1]}"


def summarize(runs):
    """Per cell, over its reps: the figures of the report."""
    out = {}
    for cell, reps in runs.items():
        snaps = [s for r in reps for s in r["snaps"]]
        pauses = [s["pause"] for s in snaps]
        attacks = [r["attack"] for r in reps if r["attack"]]
        out[cell] = {
            "ops": median([r["ops"] for r in reps]),
            "pause_med": median(pauses),
            "pause_p99": pct(pauses, 0.99),
            "stops": median([r["stops"] for r in reps]),
            "snaps": len(snaps),
            "inconsistent": sum(not s["consistent"] for s in snaps),
            "not_one_p": sum(s["num_p"] != 1 for s in snaps),
            "failed": sum(len(r["failed"]) for r in reps),
            "latency_med": median([s["latency"] for s in snaps]),
            "latency_p99": pct([s["latency"] for s in snaps], 0.99),
            "cpu": {
                k: median([r["cpu"][k] for r in reps if r["cpu"][k] is not None])
                for k in ("daemon", "worker", "attacker")
            },
            "ops_per_cpu": median([div(r["ops"], r["cpu"]["worker"]) for r in reps]),
            "parks": median([r["parks"] / r["seconds"] for r in reps]),
            "every": sorted(p for r in reps for p in r["every"]),
            "attack_rate": median([sum(a["answers"].values()) / a["seconds"] for a in attacks])
            if attacks
            else None,
        }
    return out


def attack_table(runs, transport):
    """Rows per attack kind over every flood cell of `transport` (reps and modes summed), and
    whether every reply was the one expected."""
    kinds, sent, answers = {}, collections.Counter(), collections.Counter()
    unanswered, pids_shown, unknown = 0, 0, collections.Counter()
    for (t, _mode), reps in runs.items():
        if t != transport:
            continue
        for r in reps:
            a = r["attack"]
            if not a:
                continue
            unanswered += a["unanswered"]
            pids_shown += a["pids_shown"]
            for i, (name, expected) in enumerate(a["kinds"]):
                kinds[name] = expected
                sent[name] += a["sent"][i]
            for (i, code), n in a["answers"].items():
                if i < 0:
                    unknown[code] += n
                else:
                    answers[(a["kinds"][i][0], code)] += n
    rows, ok = [], not unanswered and not unknown and not pids_shown
    for name, expected in kinds.items():
        codes = {c: n for (k, c), n in answers.items() if k == name}
        good = set(codes) <= {expected} and sum(codes.values()) == sent[name]
        ok = ok and good
        rows.append(
            [
                name,
                expected,
                fmt_num(sent[name]),
                ", ".join(f"{c} {fmt_num(n)}" for c, n in sorted(codes.items())) or "–",
                "yes" if good else "**NO**",
            ]
        )
    return rows, ok, unanswered, unknown, pids_shown


LOG_COUNTS = (
    "request refused",
    "refusals held",
    "refusal not answered",
    "P joined",
    "P left",
    "P re-registered",
    "P reclaimed",
    "reply not sent",
)


def log_counts(text):
    counts = {k: sum(1 for line in text.splitlines() if f" {k}" in line) for k in LOG_COUNTS}
    counts["suppressed"] = sum(int(m) for m in re.findall(r"suppressed=(\d+)", text))
    return counts


def report(args, runs, sess, out, t_start, load0):
    cpus = args.ncpus
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    rev = git_revision()
    started = [line for d in sess.daemons.values() for line in d.log().splitlines() if " started " in line]
    realtime = sorted({m for line in started for m in re.findall(r"realtime_pause=(\w+)", line)})
    out("### Flood: unauthenticated clients against a worker and an observer")
    out("")
    out("```sh")
    out(cmd)
    out("```")
    out("")
    out(
        f"nproc {cpus}, {cpu_model() or '?'}, Python {sys.version.split()[0]}; code {rev or '?'}; "
        f"{time.strftime('%Y-%m-%d %H:%M')}; load average {load0:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end"
    )
    out(
        f"{args.reps} rep(s) of {args.seconds:g} s per cell, round robin; snapshots at {args.rate:g}/s; "
        f"worker windows {args.window:g} s; attacker in flight: {args.refusal_window} refusal requests, "
        f"{args.stats_window} stats requests; daemons: --max-heap 512M, no metrics, "
        f"--min-stop-interval-ms 5, --park-deadline-ms 2000, --refusal-budget 200 400, "
        f"--global-refusal-budget 1000 2000, --snapshot-budget 20 40, --tarpit-ms 250 (defaults)"
        + (f", then {args.daemon_args}" if args.daemon_args else "")
        + "; the pause SCHED_FIFO: "
        f"{'/'.join(realtime) or '?'} (the daemons' `started` line)"
        + (
            f"; pinned: the worker on CPU {sorted(args.pinned[0])}, the daemons, the attacker and the "
            f"observer on CPUs {sorted(args.pinned[1])}"
            if args.pinned
            else ""
        )
    )
    out("")
    summ = summarize(runs)
    base = {t: summ.get((t, "none")) for t in {c[0] for c in runs}}

    # The main table.
    rows, verdicts = [], []
    for cell, s in summ.items():
        b = base.get(cell[0])
        r_ops = div(s["ops"], b and b["ops"]) if cell[1] != "none" else None
        r_med = div(s["pause_med"], b and b["pause_med"]) if cell[1] != "none" else None
        r_p99 = div(s["pause_p99"], b and b["pause_p99"]) if cell[1] != "none" else None
        rows.append(
            [
                cell_name(cell),
                fmt_num(s["ops"]),
                rt(r_ops),
                ms(s["pause_med"]),
                rt(r_med),
                ms(s["pause_p99"]),
                rt(r_p99),
                f"{s['stops']:.1f}" if s["stops"] is not None else "–",
                s["snaps"],
                s["inconsistent"] or 0,
                fmt_num(s["attack_rate"]) if s["attack_rate"] is not None else "–",
            ]
        )
        if cell[1] != "none":
            verdicts.append((cell, r_ops, r_med, r_p99))
    out(
        "Worker throughput (median over reps of each rep's median window), the snapshot pause (every "
        "snapshot of the cell, reps pooled), stops of the world per second (snapshot epochs: every pause, "
        "the attacker's included), and the attack's replies per second. Ratios are to the undisturbed "
        "cell of the same transport."
    )
    out("")
    out(
        md_table(
            [
                "cell",
                "worker ops/s",
                "ratio",
                "pause median ms",
                "ratio",
                "pause p99 ms",
                "ratio",
                "stops/s",
                "snapshots",
                "inconsistent",
                "attack replies/s",
            ],
            rows,
        )
    )
    out("")

    rows = []
    for cell, s in summ.items():
        ev = s["every"]
        rows.append(
            [
                cell_name(cell),
                fmt_num(len(ev)),
                ms(median(ev)),
                ms(pct(ev, 0.99)),
                ms(pct(ev, 0.999)),
                ms(ev[-1] if ev else None),
                sum(p > 1e6 for p in ev),
                sum(p > 10e6 for p in ev),
            ]
        )
    out(
        "Every pause of the measured time (reps pooled): the observer's snapshots and, in a flood cell, "
        "every snapshot the attacker was answered (its stats requests always wait for the next pause, so "
        "it sees almost every one). Not the criterion's figure -- the observer samples the same way in "
        "every cell -- but what the worker lived through."
    )
    out("")
    out(md_table(["cell", "pauses", "median ms", "p99 ms", "p99.9 ms", "max ms", "> 1 ms", "> 10 ms"], rows))
    out("")

    stalls = {cell: [d for r in reps for d in r["stalls"]] for cell, reps in runs.items()}
    rows = []
    for cell, reps in runs.items():
        snaps = [x for r in reps for x in r["snaps"]]
        states = collections.Counter(st for x in snaps for st in x["states"])
        rows.append(
            [
                cell_name(cell),
                ms(median([x["park"] for x in snaps])),
                ms(pct([x["park"] for x in snaps], 0.99)),
                ms(median([x["flush"] for x in snaps])),
                ms(median([x["pause"] - x["park"] for x in snaps])),
                ms(median(stalls[cell])),
                ms(pct(stalls[cell], 0.99)),
                ", ".join(f"{k} {v}" for k, v in states.most_common()) or "–",
            ]
        )
    out(
        "Anatomy of the observer's pauses: `park_ns` (until the worker was stopped -- the stopped "
        "workers' caches are flushed before it ends, so this includes the flush; while the daemon "
        "waits for a worker caught inside a call it answers the light ops waiting on its socket), "
        "`flush_ns`, the rest of the pause "
        "(reading the figures, resuming), and the state the worker was stopped in (stopped: from the "
        "daemon's side, between two calls; parked: caught inside a call, it parked itself). Beside them, "
        "the pause as the worker felt it: every batch of 112 pairs during which the worker parked (for any "
        "snapshot, the attacker's too), less the median batch (about 0.1 ms)."
    )
    out("")
    out(
        md_table(
            [
                "cell",
                "park median ms",
                "park p99 ms",
                "flush median ms",
                "rest median ms",
                "worker's stall per park median ms",
                "p99 ms",
                "worker stopped as",
            ],
            rows,
        )
    )
    out("")

    # Where the CPU goes.
    rows = []
    for cell, s in summ.items():
        b = base.get(cell[0])
        extra = None
        if cell[1] != "none" and b and s["attack_rate"] and s["cpu"]["daemon"] is not None:
            extra = (s["cpu"]["daemon"] - b["cpu"]["daemon"]) / s["attack_rate"] * 1e6
        rows.append(
            [
                cell_name(cell),
                pc(s["cpu"]["daemon"]),
                pc(s["cpu"]["worker"]),
                pc(s["cpu"]["attacker"]) if cell[1] != "none" else "–",
                fmt_num(s["ops_per_cpu"]),
                rt(div(s["ops_per_cpu"], b and b["ops_per_cpu"])) if cell[1] != "none" else "–",
                f"{extra:.1f}" if extra is not None else "–",
                f"{s['parks']:.1f}",
                ms(s["latency_med"]),
                ms(s["latency_p99"]),
            ]
        )
    out(
        f"Where the CPU goes ({cpus} CPUs here): each process's CPU time per second of the cell (/proc, every "
        "thread; the attacker's during the flood), the worker's pairs per second of its own CPU and "
        "its ratio to undisturbed (what a pair costs the worker, contention for CPUs aside), the "
        "daemon's CPU per attack reply over its undisturbed CPU, how often the worker parked itself, "
        "and the observer's stats latency (request to reply)."
    )
    out("")
    out(
        md_table(
            [
                "cell",
                "daemon CPU",
                "worker CPU",
                "attacker CPU",
                "worker ops per CPU-s",
                "ratio",
                "daemon µs per attack reply",
                "worker parks/s",
                "observer latency median ms",
                "p99 ms",
            ],
            rows,
        )
    )
    out("")

    # The replies.
    checks = []
    for t in sess.daemons:
        if not any(c[0] == t and c[1] != "none" for c in runs):
            continue
        rows, ok, unanswered, unknown, pids_shown = attack_table(runs, t)
        out(f"Attack replies over {t}:// (every flood cell of it, reps summed), by error code:")
        out("")
        out(
            md_table(
                ["attack", "expected", "sent", "replies", "as expected"], rows, [False, False] + [True] * 3
            )
        )
        out("")
        if unanswered or unknown or pids_shown:
            out(
                f"- {unanswered} request(s) unanswered, {sum(unknown.values())} repl(ies) without a "
                f"known id {dict(unknown)}, {pids_shown} snapshot(s) over tcp:// naming a pid"
            )
            out("")
        checks.append((f"every attack over {t}:// answered, with the reply expected", ok))
    for t, d in sess.daemons.items():
        lc = log_counts(d.log())
        cells = sum(len(reps) for c, reps in runs.items() if c[0] == t)
        hijack_free = lc["P re-registered"] == 0 and lc["P left"] <= cells and lc["P joined"] == cells
        out(
            f"- {t} daemon log: {lc['request refused']} 'request refused' and {lc['refusals held']} "
            f"'refusals held' line(s) written, {lc['suppressed']} suppressed (rate limit), "
            f"{lc['refusal not answered']} 'refusal not answered'; P joined {lc['P joined']}, P left {lc['P left']}, "
            f"P re-registered {lc['P re-registered']}, P reclaimed {lc['P reclaimed']} "
            f"({cells} worker connection(s)); replies not sent {lc['reply not sent']}"
        )
        checks.append(
            (f"{t}: no slot hijacked (no re-registration; joins and leaves are the worker's)", hijack_free)
        )
        checks.append(
            (
                f"{t}: the daemon up after every cell",
                all(r["up"] for c, reps in runs.items() if c[0] == t for r in reps),
            )
        )
    snaps_ok = all(
        s["inconsistent"] == 0 and s["not_one_p"] == 0 and s["failed"] == 0 and s["snaps"]
        for s in summ.values()
    )
    checks.append(("every observer snapshot answered, consistent, with the worker's one P", snaps_ok))
    if not snaps_ok:
        for cell, s in summ.items():
            if s["inconsistent"] or s["not_one_p"] or s["failed"] or not s["snaps"]:
                out(
                    f"- {cell_name(cell)}: {s['inconsistent']} inconsistent, {s['not_one_p']} not with one P, "
                    f"{s['failed']} failed requests"
                )
    out("")
    out("Checks:")
    out("")
    for what, ok in checks:
        out(f"- {what}: {'yes' if ok else '**NO**'}")
    out("")
    out("Targets (throughput 0.8..1.2 x undisturbed; pause median and p99 at most 1.2 x):")
    out("")
    for cell, r_ops, r_med, r_p99 in verdicts:
        miss = []
        if r_ops is None or not 0.8 <= r_ops <= 1.2:
            miss.append(f"throughput {rt(r_ops)}")
        if r_med is None or r_med > 1.2:
            miss.append(f"pause median {rt(r_med)}")
        if r_p99 is None or r_p99 > 1.2:
            miss.append(f"pause p99 {rt(r_p99)}")
        out(
            f"- {cell_name(cell)}: throughput {rt(r_ops)}, pause median {rt(r_med)}, p99 {rt(r_p99)}: "
            + ("met" if not miss else "NOT met (" + ", ".join(miss) + ")")
        )
    out("")

    # Every rep.
    rows = []
    for cell, reps in runs.items():
        for i, r in enumerate(reps):
            pauses = [s["pause"] for s in r["snaps"]]
            a = r["attack"]
            rows.append(
                [
                    cell_name(cell),
                    i + 1,
                    fmt_num(r["ops"]),
                    r["windows"],
                    ms(median(pauses)),
                    ms(pct(pauses, 0.99)),
                    len(pauses),
                    f"{r['stops']:.1f}" if r["stops"] is not None else "–",
                    pc(r["cpu"]["daemon"]),
                    pc(r["cpu"]["worker"]),
                    fmt_num(sum(a["sent"])) if a else "–",
                ]
            )
    out("Every rep:")
    out("")
    out(
        md_table(
            [
                "cell",
                "rep",
                "worker ops/s",
                "windows",
                "pause median ms",
                "p99 ms",
                "snapshots",
                "stops/s",
                "daemon CPU",
                "worker CPU",
                "attack requests sent",
            ],
            rows,
        )
    )
    out("")
    warn = []
    for t, d in sess.daemons.items():
        warn += [
            f"[{t}] {line}"
            for line in d.log().splitlines()
            if (" warning " in line or " error " in line)
            and "request refused" not in line
            and "refusals held" not in line
        ]
    if warn:
        out(f"Daemon log warnings/errors other than refusals ({len(warn)}), the last 10:")
        out("")
        out("```")
        out("\n".join(warn[-10:]))
        out("```")
        out("")
    out(f"(whole run: {time.monotonic() - t_start:.0f} s)")
    return all(ok for _, ok in checks)


def pc(x):
    return "–" if x is None else f"{x * 100:.0f} %"


# ---------------------------------------------------------------------------------------------


def parse_cells(text, ap):
    cells = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        t, _, mode = item.partition(":")
        if t not in ("ipc", "tcp") or mode not in MODES:
            ap.error(
                f"bad cell {item!r}: TRANSPORT:MODE, TRANSPORT ipc or tcp, MODE one of {', '.join(MODES)}"
            )
        cells.append((t, mode))
    for t in {c[0] for c in cells}:
        if any(c[0] == t and c[1] != "none" for c in cells) and (t, "none") not in cells:
            cells.insert(0, (t, "none"))  # the baseline of its ratios
    return cells


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=None, help="repetitions of every cell (default 3; --quick 1)")
    ap.add_argument(
        "--seconds", type=float, default=None, help="measured seconds per cell (default 5; --quick 2)"
    )
    ap.add_argument("--rate", type=float, default=20.0, help="the observer's snapshots a second (default 20)")
    ap.add_argument(
        "--window", type=float, default=0.25, help="the worker's counting window, s (default 0.25)"
    )
    ap.add_argument(
        "--cells",
        default=None,
        help=f"TRANSPORT:MODE,... (default {DEFAULT_CELLS}; --quick {QUICK_CELLS}); modes {', '.join(MODES)}",
    )
    ap.add_argument("--refusal-window", type=int, default=64, help="refusal requests in flight (default 64)")
    ap.add_argument("--stats-window", type=int, default=16, help="stats requests in flight (default 16)")
    ap.add_argument(
        "--pin",
        action="store_true",
        help="diagnostic: the worker alone on the first CPU, the daemons, the attacker and the observer "
        "on the others (every cell, baselines too): what the flood costs a worker that keeps its CPU",
    )
    ap.add_argument(
        "--daemon-args",
        default="",
        help='diagnostic: more options for both daemons, e.g. "--refusal-budget 1e9 1e9 '
        '--global-refusal-budget 1e9 1e9" (no tarpit: what each refusal costs)',
    )
    ap.add_argument("--quick", action="store_true", help="a smoke run of about 20 s")
    args = ap.parse_args(argv)
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    args.seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    cells = parse_cells(args.cells or (QUICK_CELLS if args.quick else DEFAULT_CELLS), ap)
    if args.reps < 1 or args.seconds <= 0 or args.rate <= 0 or args.window <= 0:
        ap.error("--reps, --seconds, --rate and --window must be positive")
    if args.refusal_window < 1 or args.stats_window < 1:
        ap.error("--refusal-window and --stats-window must be at least 1")

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    def out(msg):
        print(msg, flush=True)

    pin, old_affinity = None, os.sched_getaffinity(0)
    args.ncpus = len(old_affinity)
    if args.pin:
        cpus = sorted(old_affinity)
        if len(cpus) < 2:
            ap.error("--pin needs at least 2 CPUs")
        pin = ({cpus[0]}, set(cpus[1:]))
    args.pinned = pin
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    t_start, load0 = time.monotonic(), os.getloadavg()[0]
    sess = None
    try:
        if pin:
            os.sched_setaffinity(0, pin[1])  # the observer; the children start from it
        sess = Session(sorted({c[0] for c in cells}), args.window, log, pin, shlex.split(args.daemon_args))
        runs = {c: [] for c in cells}
        for rep in range(args.reps):
            order = cells[rep % len(cells) :] + cells[: rep % len(cells)]
            log(f"rep {rep + 1} of {args.reps}: {', '.join(map(cell_name, order))}")
            for cell in order:
                runs[cell].append(run_cell(sess, cell, args, log))
        ok = report(args, runs, sess, out, t_start, load0)
    except KeyboardInterrupt:
        log("interrupted: every process, socket and arena this run made is being removed")
        return 130
    finally:
        if sess is not None:
            sess.close()
        if pin:
            os.sched_setaffinity(0, old_affinity)
        signal.signal(signal.SIGTERM, old_term)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
