"""What a snapshot's flush costs the daemon, without the daemon: Arena.flush_slots in one process.

    python bench/bench_flush.py [--ps 8] [--reps 30]

A snapshot stops every P and flushes its cache before it reads anything (shm/arena.py
`flush_slots`: each P's buffered remote frees applied, each cached span given back to its
central list, each large span settled), and that flush is most of the pause once the Ps are
stopped.  Here --ps ProcessCaches in one process (so no stop, no daemon, no socket: the flush
alone) each hold 8 live blocks of each of 16, 64, 200, 1000, 5000 and 40000 bytes -- the live
set of bench/bench_snapshot.py's workers.  Before each timed flush every P frees each of its
blocks and allocates it again; after a flush the blocks it frees sit in spans it no longer
caches, so those frees are buffered, as a worker's are between two snapshots.  Prints the median
and the minimum of --reps flushes of all the Ps, and what one flush did (spans given back and
listed objects uncounted per P).  To compare two trees, run each tree's copy of this script.
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _benchlib import cpu_model, git_revision  # noqa: E402

from shm import Arena, ProcessCache  # noqa: E402

SIZES = (16, 64, 200, 1000, 5000, 40000)
LIVE = 8


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ps", type=int, default=8, help="Ps flushed together (default 8)")
    ap.add_argument("--reps", type=int, default=30, help="timed flushes (default 30)")
    args = ap.parse_args(argv)
    arena = Arena.create(f"shmalloc-bench-flush-{os.getpid()}", 256 << 20, nslots=args.ps + 2)
    try:
        caches = [ProcessCache(arena) for _ in range(args.ps)]
        live = [[p.alloc(s) for s in SIZES for _ in range(LIVE)] for p in caches]
        slots = [p.slot for p in caches]

        def churn():
            for p, blocks in zip(caches, live):
                for i, b in enumerate(blocks):
                    p.free(b)
                    blocks[i] = p.alloc(SIZES[i // LIVE])

        times, done = [], {}
        for _ in range(args.reps + 3):  # the first three warm the lists up, untimed
            churn()
            t = time.perf_counter_ns()
            done = arena.flush_slots(slots, arena.daemon_actor, keep_empty=True, disown=False)
            times.append(time.perf_counter_ns() - t)
        times = times[3:]
        for p, blocks in zip(caches, live):
            for b in blocks:
                p.free(b)
            p.close()
        problems = arena.check_all()
        if problems:
            raise SystemExit(f"the arena is not healthy after the run: {problems}")
    finally:
        arena.destroy()
    print("### bench_flush: Arena.flush_slots of every P, in one process")
    print()
    print(f"{cpu_model()}; code {git_revision()}; {time.strftime('%Y-%m-%d %H:%M')}")
    print()
    print(f"{args.ps} Ps, {LIVE} live blocks of each of {', '.join(map(str, SIZES))} B; {args.reps} flushes")
    spans = statistics.median(v[0] for v in done.values())
    listed = statistics.median(v[1] for v in done.values())
    print(f"one flush, per P: {spans:.0f} spans given back, {listed:.0f} listed objects uncounted")
    print(
        f"flush of all {args.ps} Ps: median {statistics.median(times) / 1e3:.0f} us, "
        f"min {min(times) / 1e3:.0f} us ({statistics.median(times) / args.ps / 1e3:.0f} us a P)"
    )


if __name__ == "__main__":
    main()
