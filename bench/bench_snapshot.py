"""Snapshot pause (stop the world, flush every cache, read, resume) against the number and the
activity of the workers.

    python bench/bench_snapshot.py [--workers 1,2,4,8] [--snapshots 200] [--modes idle,alloc,python]

Modes:
  idle     workers connected, blocked in a wait: their control thread parks them
  alloc    workers in alloc/free loops (16..1024 B): the stop byte parks them at the next call
  python   workers busy in pure Python, outside the allocator: the control thread must win the
           GIL, bounded by the switch interval (also run at 0.5 ms: mode python@0.5ms)

Prints median and p99 of the daemon's pause_ns, as reported in each snapshot, the medians of
its two parts -- parking every P (park_ns) and flushing the caches (flush_ns) -- and when the
last P parked by the Ps' own clocks (the daemon may notice later).
"""

import argparse
import multiprocessing as mp
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def worker(endpoint, mode, ready, stop, switch_interval):
    import client

    if switch_interval:
        sys.setswitchinterval(switch_interval)
    with client.connect(endpoint) as heap:
        ready.set()
        if mode == "idle":
            stop.wait()
        elif mode == "alloc":
            alloc, free, sizes = heap.alloc, heap.free, (16, 64, 256, 1024)
            while not stop.is_set():
                for _ in range(200):
                    for s in sizes:
                        free(alloc(s))
        else:
            x = 0
            while not stop.is_set():
                for i in range(20000):
                    x += i * i


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def run_case(endpoint, n, mode, snapshots, switch_interval=None):
    import client

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    readies = [ctx.Event() for _ in range(n)]
    procs = [ctx.Process(target=worker, args=(endpoint, mode, r, stop, switch_interval)) for r in readies]
    for p in procs:
        p.start()
    for r in readies:
        r.wait(60)
    pauses, parks, flushes, last, late = [], [], [], [], 0
    try:
        for _ in range(snapshots):
            snap = client.stats(endpoint, deadline_ms=5000)
            late += not snap["consistent"]
            pauses.append(snap["pause_ns"] / 1e6)
            parks.append(snap["park_ns"] / 1e6)
            flushes.append(snap["flush_ns"] / 1e6)
            # When the last P parked, by the Ps' own clocks (the daemon may look later).
            last.append(max((p["park_ns"] for p in snap["per_p"]), default=0) / 1e6)
    finally:
        stop.set()
        for p in procs:
            p.join(60)
    return (
        pct(pauses, 0.5),
        pct(pauses, 0.99),
        max(pauses),
        late,
        pct(parks, 0.5),
        pct(flushes, 0.5),
        pct(last, 0.5),
        pct(last, 0.99),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--snapshots", type=int, default=200)
    ap.add_argument("--modes", default="idle,alloc,python,python@0.5ms")
    args = ap.parse_args(argv)
    from service.demo import start_daemon

    tmp = tempfile.mkdtemp(prefix="shmalloc-bench-")
    endpoint = f"ipc://{tmp}/control.sock"
    daemon = start_daemon(endpoint, "512M")
    try:
        print(
            f"{'mode':16s} {'workers':>7s} {'median ms':>10s} {'p99 ms':>8s} {'max ms':>8s} {'late':>5s}"
            f" {'park med':>9s} {'flush med':>9s} {'last P parked med/p99':>22s}"
        )
        for mode in args.modes.split(","):
            base, _, si = mode.partition("@")
            interval = float(si.removesuffix("ms")) / 1000 if si else None
            for n in (int(x) for x in args.workers.split(",")):
                med, p99, mx, late, park, flush, lp50, lp99 = run_case(
                    endpoint, n, base, args.snapshots, interval
                )
                print(
                    f"{mode:16s} {n:7d} {med:10.3f} {p99:8.3f} {mx:8.3f} {late:5d} {park:9.3f} {flush:9.3f}"
                    f" {lp50:11.3f}/{lp99:.3f}",
                    flush=True,
                )
    finally:
        daemon.terminate()
        daemon.wait(30)
        os.rmdir(tmp)


if __name__ == "__main__":
    main()
