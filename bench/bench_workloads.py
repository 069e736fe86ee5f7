"""mimalloc-bench-style workloads over the arena, with real processes (multiprocessing, spawn).

    python bench/bench_workloads.py [--workloads xmalloc,larson,scaling] [--reps 3] [--seconds 2]
                                    [--min-size 16] [--max-size 4096] [--procs 2] [--slots 1000]
                                    [--remote 0.1] [--quick]

A private daemon (`--max-heap 2G`) in a temp dir; --procs worker processes (default 2), spawned
once, each connected to it (client.connect), driven by the parent through a command pipe.
Every block is filled with the handle's 8 bytes repeated (one slice assignment through
block.buf) and verified -- view(handle, size).tobytes() compared with that pattern -- by the
process that frees it.  Sizes are uniform in [--min-size, --max-size] from a fixed seed (a
sequence of 65 536, cycled; a consumer replays the producer's sequence to know each block's size).
Each timed run lasts --seconds (default 2; --quick 0.3) and every workload's runs are timed
round robin within each repetition; figures are medians of --reps (default 3; --quick 1).

Rows (ops = blocks allocated and freed, per second):
  xmalloc   one producer allocates + fills, sends the handles to one consumer in batches of 256
            (array('Q') bytes over a multiprocessing Pipe); the consumer verifies and frees each:
            every free is a cross-process free.  Rate = blocks / (consumer's last free - producer's
            start).  Baseline, same run: ONE process doing alloc + fill + view + verify + free of
            the same size sequence (the same per-block work).  Ratio xmalloc / single: target >= 0.5.
  larson    --procs processes, each with a table of --slots live blocks; each step picks a random
            slot, frees its block and allocates a new one (random size) in its place; a fraction
            --remote (default 0.1) of those blocks is not freed locally but handed to the next
            process of a ring (batches of 256 (handle, size) pairs over a Pipe), which verifies and
            frees it.  Rate = the sum of the processes' steps per second.  Baseline, same run: one
            process, the same loop, every free local.  Ratio N processes / 1 process (2.0 ideal
            on 2 cores with 2 processes).
  scaling   the same local loop in 1 process, then in 2 processes at once (each its own blocks);
            ratio = 2-process aggregate / 1 process (2.0 ideal on 2 cores): "alloc+fill+verify+free"
            (the xmalloc baseline's loop) and "alloc+free" (nothing written: the allocator alone).

Prints a markdown table: medians, the baseline, the ratio, the target; then every run's figure.
Machines are shared and noisy: compare the ratios of one run, never a bare rate.
"""

import argparse
import os
import random
import select
import sys
import time
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import (  # noqa: E402
    Session,
    WorkerError,
    call,
    child_init,
    fmt_num,
    fmt_ratio,
    fmt_size,
    header,
    md_table,
    median,
    pattern,
    ratio,
    serve,
)

SEQ = 1 << 16  # length of a pre-generated random sequence (a power of 2)
BATCH = 256  # handles per pipe message


# ---------------------------------------------------------------------------------------------
# the worker process


class State:
    def __init__(self, endpoint, ctl, inn, out):
        import client

        self.heap = client.connect(endpoint)
        self.ctl, self.inn, self.out = ctl, inn, out
        self._sizes = {}
        self._seqs = {}

    def start(self):
        """Setup done: tell the parent, and wait for the common start time it sends back."""
        self.ctl.send(("ready", None))
        wait_until(self.ctl.recv())
        return time.perf_counter()

    def larson_seq(self, seed, slots, remote, ring):
        key = (seed, slots, remote, ring)
        if key not in self._seqs:
            rng = random.Random(seed)
            self._seqs[key] = (
                [rng.randrange(slots) for _ in range(SEQ)],
                [ring and rng.random() < remote for _ in range(SEQ)],
            )
        return self._seqs[key]

    def sizes(self, seed, lo, hi):
        key = (seed, lo, hi)
        if key not in self._sizes:
            rng = random.Random(seed)
            self._sizes[key] = [rng.randint(lo, hi) for _ in range(SEQ)]
        return self._sizes[key]

    def close(self):
        self.heap.close()


def wait_until(t0):
    while True:
        d = t0 - time.perf_counter()
        if d <= 0:
            return
        time.sleep(min(d, 0.05))


def bad_block(h, s, mv):
    raise AssertionError(f"block {h} ({s} B) does not hold its pattern: {bytes(mv[:16]).hex()}...")


def xmalloc_produce(st, seconds, sizes):
    alloc, out = st.heap.alloc, st.out
    seq = st.sizes(*sizes)
    mask = SEQ - 1
    i = 0
    t_start = st.start()
    t_end = t_start + seconds
    while True:
        hs = array("Q")
        for _ in range(BATCH):
            s = seq[i & mask]
            i += 1
            b = alloc(s)
            h = b.handle
            b.buf[:] = pattern(h, s)
            hs.append(h)
        out.send_bytes(hs)
        if time.perf_counter() >= t_end:
            break
    out.send_bytes(b"")
    return {"t_start": t_start, "blocks": i}


def xmalloc_consume(st, sizes):
    view, free, inn = st.heap.view, st.heap.free, st.inn
    seq = st.sizes(*sizes)
    mask = SEQ - 1
    i = 0
    while True:
        data = inn.recv_bytes()
        if not data:
            break
        hs = array("Q")
        hs.frombytes(data)
        for h in hs:
            s = seq[i & mask]
            i += 1
            mv = view(h, s)
            if mv.tobytes() != pattern(h, s):
                bad_block(h, s, mv)
            free(h)
    return {"t_end": time.perf_counter(), "blocks": i}


def pairs(st, seconds, sizes, fill):
    """The local loop: alloc + fill + view + verify + free(handle), or bare alloc + free(block)."""
    alloc, view, free = st.heap.alloc, st.heap.view, st.heap.free
    seq = st.sizes(*sizes)
    mask = SEQ - 1
    i = 0
    t_start = st.start()
    t_end = t_start + seconds
    while True:
        if fill:
            for _ in range(BATCH):
                s = seq[i & mask]
                i += 1
                b = alloc(s)
                h = b.handle
                b.buf[:] = pattern(h, s)
                mv = view(h, s)
                if mv.tobytes() != pattern(h, s):
                    bad_block(h, s, mv)
                free(h)
        else:
            for _ in range(BATCH):
                free(alloc(seq[i & mask]))
                i += 1
        if time.perf_counter() >= t_end:
            break
    return {"elapsed": time.perf_counter() - t_start, "blocks": i}


def larson(st, seconds, sizes, seed, slots, remote, ring):
    alloc, view, free = st.heap.alloc, st.heap.view, st.heap.free
    inn, out = st.inn, st.out
    seq = st.sizes(*sizes)
    mask = SEQ - 1
    pick, away = st.larson_seq(seed, slots, remote, ring)
    th, ts = [0] * slots, [0] * slots
    for j in range(slots):
        s = seq[(j * 7919) & mask]
        b = alloc(s)
        th[j], ts[j] = b.handle, s
        b.buf[:] = pattern(b.handle, s)
    outbox = array("Q")
    counts = {"sent": 0, "freed_remote": 0}

    def free_remote(data):
        hs = array("Q")
        hs.frombytes(data)
        for k in range(0, len(hs), 2):
            h, s = hs[k], hs[k + 1]
            mv = view(h, s)
            if mv.tobytes() != pattern(h, s):
                bad_block(h, s, mv)
            free(h)
        counts["freed_remote"] += len(hs) // 2

    def drain(timeout=0):
        """Free what the previous process handed over; True once its end marker came."""
        while inn.poll(timeout):
            data = inn.recv_bytes()
            if not data:
                return True
            free_remote(data)
            timeout = 0
        return False

    ended = [False]

    def send(data):
        # Never block on a full pipe while the other side may be blocked on ours: drain first.
        while not select.select([], [out], [], 0)[1]:
            ended[0] |= drain(0.001)
        out.send_bytes(data)

    i = steps = 0
    t_start = st.start()
    t_end = t_start + seconds
    while True:
        for _ in range(64):
            k = i & mask
            i += 1
            j = pick[k]
            h, s = th[j], ts[j]
            if away[k]:
                outbox.append(h)
                outbox.append(s)
            else:
                mv = view(h, s)
                if mv.tobytes() != pattern(h, s):
                    bad_block(h, s, mv)
                free(h)
            s = seq[k]
            b = alloc(s)
            h = b.handle
            b.buf[:] = pattern(h, s)
            th[j], ts[j] = h, s
        steps += 64
        if ring:
            if not ended[0]:
                ended[0] = drain()
            if len(outbox) >= 2 * BATCH:
                counts["sent"] += len(outbox) // 2
                send(outbox)
                outbox = array("Q")
        if time.perf_counter() >= t_end:
            break
    elapsed = time.perf_counter() - t_start
    if ring:
        if outbox:
            counts["sent"] += len(outbox) // 2
            send(outbox)
        send(b"")
        while not ended[0]:
            ended[0] = drain(0.1)
    for j in range(slots):
        free(th[j])
    return {"steps": steps, "elapsed": elapsed, **counts}


HANDLERS = {
    "xmalloc_produce": xmalloc_produce,
    "xmalloc_consume": xmalloc_consume,
    "pairs": pairs,
    "larson": larson,
    "ping": lambda st: os.getpid(),
}


def worker_main(endpoint, ctl, inn, out):
    child_init()
    serve(ctl, HANDLERS, setup=lambda: State(endpoint, ctl, inn, out))


# ---------------------------------------------------------------------------------------------
# the parent


def gather(ctls, timeout=900):
    """The answers of several workers; the first error raises at once (the session then
    terminates everyone, including a worker blocked on a peer that failed)."""
    from multiprocessing.connection import wait

    out, pending = {}, {c: i for i, c in enumerate(ctls)}
    deadline = time.monotonic() + timeout
    while pending:
        ready = wait(list(pending), max(0, deadline - time.monotonic()))
        if not ready:
            raise WorkerError(f"no answer from {len(pending)} worker(s) within {timeout} s")
        for c in ready:
            status, value = c.recv()
            if status != "ok":
                raise WorkerError(value)
            out[pending.pop(c)] = value
    return [out[i] for i in range(len(ctls))]


def run_all(ctls, jobs, start_delay=0.05):
    try:
        return _run_all(ctls, jobs, start_delay)
    except WorkerError as e:
        raise WorkerError(f"in {', '.join(sorted({name for _, name, _, _ in jobs}))}:\n{e}") from None


def _run_all(ctls, jobs, start_delay):
    """jobs: [(worker index, command, kwargs, timed)].  The timed ones set up, say "ready", and
    start together at a common time t0 the parent sends once all of them are ready."""
    for w, name, kw, _ in jobs:
        call(ctls[w], name, **kw)
    timed = [ctls[w] for w, _, _, t in jobs if t]
    for c in timed:
        if not c.poll(600):
            raise WorkerError("a worker did not get ready within 600 s")
        status, value = c.recv()
        if status != "ready":
            raise WorkerError(value)
    t0 = time.perf_counter() + start_delay
    for c in timed:
        c.send(t0)
    return gather([ctls[w] for w, _, _, _ in jobs])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="xmalloc,larson,scaling")
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; --quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="one timed run (default 2; --quick 0.3)")
    ap.add_argument("--min-size", type=int, default=16)
    ap.add_argument("--max-size", type=int, default=4096)
    ap.add_argument("--procs", type=int, default=2, help="larson's processes (>= 2)")
    ap.add_argument("--slots", type=int, default=1000, help="larson's live blocks per process")
    ap.add_argument(
        "--remote", type=float, default=0.1, help="larson's fraction of blocks freed by the next process"
    )
    ap.add_argument("--seed", type=int, default=4141)
    ap.add_argument("--max-heap", default="2G")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    secs = args.seconds or (0.3 if args.quick else 2.0)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in workloads:
        if w not in ("xmalloc", "larson", "scaling"):
            ap.error(f"unknown workload {w!r}")
    if args.procs < 2:
        ap.error("--procs must be at least 2")
    if not 8 <= args.min_size <= args.max_size:
        ap.error("need 8 <= --min-size <= --max-size")
    sizes = (args.seed, args.min_size, args.max_size)

    print(header("bench_workloads: xmalloc, larson, scaling"), flush=True)
    print()
    print(
        f"sizes uniform in {fmt_size(args.min_size)}..{fmt_size(args.max_size)}; {secs:g} s per timed run; "
        f"medians of {reps}; larson: {args.procs} processes x {args.slots} slots, "
        f"{args.remote:.0%} freed by the next process",
        flush=True,
    )
    print()
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rates = {}  # row -> {"multi": [...], "single": [...]}

    def add(row, kind, v):
        rates.setdefault(row, {"multi": [], "single": []})[kind].append(v)

    with Session(args.max_heap) as session:
        P = args.procs
        links = [ctx.Pipe() for _ in range(P)]  # link i: worker i -> worker i+1
        ctls = []
        for i in range(P):
            parent_end, child_end = ctx.Pipe()
            ctls.append(parent_end)
            session.spawn(
                worker_main,
                (session.endpoint, child_end, links[(i - 1) % P][1], links[i][0]),
                name=f"bench-worker-{i}",
            )
            child_end.close()
        for lk in links:
            lk[0].close()
            lk[1].close()
        for c in ctls:
            call(c, "ping")
        gather(ctls, timeout=120)

        for rep in range(reps):
            if "xmalloc" in workloads:
                a, b = run_all(
                    ctls,
                    [
                        (1, "xmalloc_consume", {"sizes": sizes}, False),
                        (0, "xmalloc_produce", {"seconds": secs, "sizes": sizes}, True),
                    ],
                )
                assert a["blocks"] == b["blocks"], (a, b)
                add("xmalloc", "multi", b["blocks"] / (a["t_end"] - b["t_start"]))
                (r,) = run_all(ctls, [(0, "pairs", {"seconds": secs, "sizes": sizes, "fill": True}, True)])
                add("xmalloc", "single", r["blocks"] / r["elapsed"])
            if "larson" in workloads:
                rs = run_all(
                    ctls,
                    [
                        (
                            w,
                            "larson",
                            {
                                "seconds": secs,
                                "sizes": (args.seed + w, *sizes[1:]),
                                "seed": args.seed * 31 + w,
                                "slots": args.slots,
                                "remote": args.remote,
                                "ring": True,
                            },
                            True,
                        )
                        for w in range(P)
                    ],
                )
                sent = sum(r["sent"] for r in rs)
                got = sum(r["freed_remote"] for r in rs)
                assert sent == got, f"larson: {sent} blocks handed over, {got} freed by the receivers"
                add("larson", "multi", sum(r["steps"] / r["elapsed"] for r in rs))
                (r,) = run_all(
                    ctls,
                    [
                        (
                            0,
                            "larson",
                            {
                                "seconds": secs,
                                "sizes": sizes,
                                "seed": args.seed * 31,
                                "slots": args.slots,
                                "remote": 0.0,
                                "ring": False,
                            },
                            True,
                        )
                    ],
                )
                add("larson", "single", r["steps"] / r["elapsed"])
            if "scaling" in workloads:
                for fill, row in ((True, "scaling fill"), (False, "scaling bare")):
                    (r,) = run_all(
                        ctls, [(0, "pairs", {"seconds": secs, "sizes": sizes, "fill": fill}, True)]
                    )
                    add(row, "single", r["blocks"] / r["elapsed"])
                    rs = run_all(
                        ctls,
                        [
                            (
                                w,
                                "pairs",
                                {"seconds": secs, "sizes": (args.seed + w, *sizes[1:]), "fill": fill},
                                True,
                            )
                            for w in range(2)
                        ],
                    )
                    add(row, "multi", sum(r["blocks"] / r["elapsed"] for r in rs))
            print(f"repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)

        for c in ctls:
            call(c, "quit")
        gather(ctls, timeout=60)
        for p in session.procs:
            p.join(10)

    labels = {
        "xmalloc": (
            "xmalloc: 1 producer -> 1 consumer, every free cross-process",
            "2",
            "1 process, same blocks",
            "xmalloc / single",
            ">= 0.5",
        ),
        "larson": (
            f"larson: {args.slots} live blocks per process, {args.remote:.0%} freed by the next",
            str(args.procs),
            "1 process, all frees local",
            f"{args.procs} procs / 1",
            f"{args.procs}.0 ideal",
        ),
        "scaling fill": (
            "scaling: alloc+fill+verify+free, own blocks",
            "2",
            "1 process",
            "2 procs / 1",
            "2.0 ideal",
        ),
        "scaling bare": (
            "scaling: alloc+free (nothing written), own blocks",
            "2",
            "1 process",
            "2 procs / 1",
            "2.0 ideal",
        ),
    }
    rows, runs = [], []
    for row, v in rates.items():
        name, procs, base, rname, target = labels[row]
        m, s = median(v["multi"]), median(v["single"])
        rows.append(
            [name, procs, fmt_num(m), f"{fmt_num(s)} ({base})", f"{fmt_ratio(ratio(m, s))} ({rname})", target]
        )
        runs.append(
            [name, ", ".join(fmt_num(x) for x in v["multi"]), ", ".join(fmt_num(x) for x in v["single"])]
        )
    print(
        md_table(
            ["workload", "processes", "blocks/s (median)", "baseline blocks/s", "ratio", "target"],
            rows,
            right=[False, True, True, True, True, False],
        )
    )
    print()
    print("every run (blocks/s):")
    print()
    print(md_table(["workload", "multi-process runs", "baseline runs"], runs, right=[False, True, True]))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
