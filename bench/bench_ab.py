"""A/B of the fast path of two source trees, in ONE process: the 64 B alloc+free pair (or
--size bytes: 4096 for a class whose blocks are multiples of 128 bytes, 1048576 for a large one).

    python bench/bench_ab.py A_TREE B_TREE [--rounds 40] [--n 20000] [--high] [--size 64]

Each tree's `shm` package is imported under a name of its own (shm_a, shm_b: shm imports only
itself, relatively), each makes an arena (256 MiB heap, as bench_alloc.py's) and a
ProcessCache -- the closures client.Heap runs -- and the two pair loops are timed in turn, in
chunks of --n pairs, the order swapped every round.  So the drift of a shared machine, which
makes two runs of bench_alloc.py minutes apart incomparable, hits A and B alike.  Prints each
side's median and min ns per pair and the median of the per-round ratios B/A, for free(block)
and free(handle).  --high first allocates 40 MiB, so the 64 B span lies past it (larger
handles).
"""

import argparse
import importlib.util
import statistics
import sys
import time
import uuid


def load(name, tree):
    spec = importlib.util.spec_from_file_location(
        name, f"{tree}/shm/__init__.py", submodule_search_locations=[f"{tree}/shm"]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def pairs(p, n, by_handle, size=64):
    alloc, free = p.alloc, p.free
    t = time.perf_counter_ns()
    if by_handle:
        for _ in range(n):
            free(alloc(size)[0])
    else:
        for _ in range(n):
            free(alloc(size))
    return (time.perf_counter_ns() - t) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a_tree")
    ap.add_argument("b_tree")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--high", action="store_true")
    ap.add_argument("--size", type=int, default=64, help="bytes a block (default 64)")
    args = ap.parse_args(argv)
    sides = {}
    for key, tree in (("a", args.a_tree), ("b", args.b_tree)):
        shm = load(f"shm_{key}", tree)
        arena = shm.Arena.create(f"shmalloc-ab-{uuid.uuid4().hex[:8]}", 256 << 20, 4)
        p = shm.ProcessCache(arena)
        pad = p.alloc(40 << 20) if args.high else None
        pairs(p, args.n // 4, False, args.size)  # warm-up: the closures specialize
        sides[key] = (arena, p, pad)
    try:
        times = {(k, by): [] for k in sides for by in (False, True)}
        for r in range(args.rounds):
            order = ["a", "b"] if r % 2 == 0 else ["b", "a"]
            for by in (False, True):
                for k in order:
                    times[k, by].append(pairs(sides[k][1], args.n, by, args.size))
        print(
            f"A = {args.a_tree}\nB = {args.b_tree}\n{args.size} B pairs, {args.rounds} rounds of {args.n}, ns per pair"
        )
        for by, label in ((False, "free(block)"), (True, "free(handle)")):
            a, b = times["a", by], times["b", by]
            ratio = statistics.median(y / x for x, y in zip(a, b))
            print(
                f"{label:13s} A median {statistics.median(a):6.0f} min {min(a):6.0f}   "
                f"B median {statistics.median(b):6.0f} min {min(b):6.0f}   B/A per round, median {ratio:.3f}"
            )
    finally:
        for arena, p, pad in sides.values():
            if pad is not None:
                p.free(pad)
            p.close()
            arena.destroy()


if __name__ == "__main__":
    main()
