"""What a snapshot's flush costs the daemon, without the daemon: Arena.flush_slots in one process.

    python bench/bench_flush.py [--ps 8] [--reps 30] [--tight] [--parts]

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

--tight replaces the churn by bench/bench_snapshot.py's tight loop: between two flushes each P
runs 0, 2, 10, 50 or 200 of its rounds (chosen at random, seeded) -- a 64-byte pair, then six
pairs that each replace one of its live blocks by one of the next size -- so that, as in a
pause, some Ps refilled every class since the last flush and some none.  --parts also prints
what the flush's pieces cost it (each timed around its call): grouping each P's buffered frees
(_buffer_groups), applying them (_apply_buffer, and apply_frees within it), uncaching the small
spans (uncache_span), settling the large ones (LargeObjects.flush); the rest is the flush's own
bookkeeping and its locks -- and how many buffered frees a flush applied, in how many groups (a
group: the frees of one span, applied in one step).
"""

import argparse
import collections
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _benchlib import count_calls, cpu_model, git_revision  # noqa: E402

from shm import Arena, ProcessCache  # noqa: E402

SIZES = (16, 64, 200, 1000, 5000, 40000)
LIVE = 8


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ps", type=int, default=8, help="Ps flushed together (default 8)")
    ap.add_argument("--reps", type=int, default=30, help="timed flushes (default 30)")
    ap.add_argument("--tight", action="store_true", help="tight loops between flushes (see above)")
    ap.add_argument("--parts", action="store_true", help="time the flush's pieces too")
    args = ap.parse_args(argv)
    parts, calls = {}, collections.Counter()  # piece -> [calls, ns]; counts of buffered frees
    arena = Arena.create(f"shmalloc-bench-flush-{os.getpid()}", 256 << 20, nslots=args.ps + 2)
    try:
        caches = [ProcessCache(arena) for _ in range(args.ps)]
        live = [[p.alloc(s) for s in SIZES for _ in range(LIVE)] for p in caches]
        slots = [p.slot for p in caches]

        rnd, rounds = random.Random(1), [0] * len(caches)

        def churn():
            for j, (p, blocks) in enumerate(zip(caches, live)):
                if not args.tight:
                    for i, b in enumerate(blocks):
                        p.free(b)
                        blocks[i] = p.alloc(SIZES[i // LIVE])
                    continue
                for _ in range(rnd.choice((0, 2, 10, 50, 200))):
                    p.free(p.alloc(64))
                    for s, size in enumerate(SIZES):
                        i = s * LIVE + rounds[j] % LIVE
                        p.free(blocks[i])
                        blocks[i] = p.alloc(size)
                    rounds[j] += 1

        if args.parts:
            for obj, name in (
                (arena, "_buffer_groups"),
                (arena, "_apply_buffer"),
                (arena.central, "apply_frees"),
                (arena.central, "uncache_span"),
                (arena.large, "flush"),
            ):
                parts[name] = count_calls(obj, name)
            grouped = arena._buffer_groups

            def counted(k):
                groups = grouped(k)
                calls["buffered frees"] += sum(len(hs) for hs in groups.values())
                calls["their groups"] += len(groups)
                return groups

            arena._buffer_groups = counted

        times, spans, done = [], [], {}
        warm = 3 if not args.tight else 20
        for rep in range(args.reps + warm):  # the first ones warm the lists up, untimed
            churn()
            if rep == warm:
                for acc in parts.values():
                    acc[:] = [0, 0]
                calls.clear()
            t = time.perf_counter_ns()
            done = arena.flush_slots(slots, arena.daemon_actor, keep_empty=True, disown=False)
            times.append(time.perf_counter_ns() - t)
            spans.append(sum(v[0] for v in done.values()))
        times, spans = times[warm:], spans[warm:]
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
    print(
        f"{args.ps} Ps, {LIVE} live blocks of each of {', '.join(map(str, SIZES))} B; {args.reps} flushes"
        + ("; tight loops between them (--tight)" if args.tight else "")
    )
    if args.tight:
        print(f"spans given back by a flush of all the Ps: median {statistics.median(spans):.0f}")
    else:
        per_p = statistics.median(v[0] for v in done.values())
        listed = statistics.median(v[1] for v in done.values())
        print(f"one flush, per P: {per_p:.0f} spans given back, {listed:.0f} listed objects uncounted")
    print(
        f"flush of all {args.ps} Ps: median {statistics.median(times) / 1e3:.0f} us, "
        f"min {min(times) / 1e3:.0f} us ({statistics.median(times) / args.ps / 1e3:.0f} us a P)"
    )
    if args.parts:
        mean = sum(times) / len(times)
        print(f"its pieces, per flush (mean {mean / 1e3:.0f} us):")
        n = len(times)
        for name, (k, ns) in parts.items():
            print(f"  {name}: {ns / n / 1e3:.0f} us, {k / n:.1f} calls, {ns / k / 1e3:.1f} us a call")
        print(
            f"buffered frees a flush: {calls['buffered frees'] / n:.1f}, in {calls['their groups'] / n:.1f} groups"
        )


if __name__ == "__main__":
    main()
