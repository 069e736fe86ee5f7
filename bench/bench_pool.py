"""Pool.map over numpy arrays: shmalloc heap arrays against plain numpy pickling and against
multiprocessing.shared_memory by name, in one run.

    python bench/bench_pool.py [--arrays 32] [--size 4M] [--workers 2] [--reps 7] [--start fork]

Each variant maps one task over --arrays arrays of --size bytes (float64) on a Pool of
--workers processes (the pool started and warmed up before timing) and gets an array back per
task.  The task writes one element of its argument and returns the array:
  shmalloc       a client.heap() HeapArray: the argument and the result pickle as references
                 (the parent allocates the arrays once, and frees them after the runs)
  numpy pickle   a plain ndarray: pickled whole to the worker and back (what Pool does)
  SharedMemory   (segment name, shape, dtype): the worker attaches the segment by name, writes,
                 closes, and returns the same triple
Prints the median wall time of one map (of --reps) per variant, the pickled size of one task's
argument, and the ratios.  Starts its own daemon in a temporary directory and removes every
process and /dev/shm segment it made.  Machines are shared and noisy: compare ratios.
"""

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from _benchlib import _forget_shared_memory, fmt_ratio, fmt_size, header, md_table, median, parse_size  # noqa: E402

import client  # noqa: E402


def touch(a):
    """The task of the shmalloc and numpy rows: write one element, return the array."""
    a[0] += 1.0
    return a


def touch_by_name(ref):
    """The SharedMemory row's task: attach by name, write, detach; return the same reference."""
    name, shape, dtype = ref
    seg = shared_memory.SharedMemory(name)
    _forget_shared_memory(name)  # the parent owns (and unlinks) the segment
    a = np.ndarray(shape, dtype, buffer=seg.buf)
    a[0] += 1.0
    del a
    seg.close()
    return ref


def timed_map(pool, fn, args, reps):
    pool.map(fn, args)  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        pool.map(fn, args)
        out.append(time.perf_counter() - t)
    return median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arrays", type=int, default=32)
    ap.add_argument("--size", type=parse_size, default=4 << 20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--start", default="fork", choices=["fork", "spawn", "forkserver"])
    args = ap.parse_args(argv)

    from service.demo import start_daemon

    n = args.size // 8
    ctx = multiprocessing.get_context(args.start)
    tmp = tempfile.mkdtemp(prefix="shmalloc-bench-")
    endpoint = f"ipc://{tmp}/control.sock"
    os.environ["SHMALLOC_ENDPOINT"] = endpoint  # for the workers' client.heap()
    daemon = start_daemon(endpoint, str(max(512 << 20, 3 * args.arrays * args.size)))
    rows, sizes = {}, {}
    segments = []
    try:
        heap = client.heap()
        with ctx.Pool(args.workers, initializer=client.heap) as pool:
            arrays = []
            for i in range(args.arrays):
                a = heap.ndarray(n)
                a[:] = i
                arrays.append(a)
            sizes["shmalloc"] = len(ForkingPickler.dumps(arrays[0]))
            rows["shmalloc"] = timed_map(pool, touch, arrays, args.reps)
            for a in arrays:
                heap.free(a)
            del arrays, a

            plain = [np.full(n, float(i)) for i in range(args.arrays)]
            sizes["numpy pickle"] = len(ForkingPickler.dumps(plain[0]))
            rows["numpy pickle"] = timed_map(pool, touch, plain, args.reps)
            del plain

            refs = []
            for i in range(args.arrays):
                seg = shared_memory.SharedMemory(create=True, size=n * 8)
                segments.append(seg)
                np.ndarray((n,), "float64", buffer=seg.buf)[:] = i
                refs.append((seg.name, (n,), "float64"))
            sizes["SharedMemory by name"] = len(ForkingPickler.dumps(refs[0]))
            rows["SharedMemory by name"] = timed_map(pool, touch_by_name, refs, args.reps)
            pool.close()
            pool.join()
        left = client.stats(endpoint)["heap_objects"]
    finally:
        for seg in segments:
            seg.close()
            seg.unlink()
        client.close_heap()
        daemon.terminate()
        daemon.wait(30)
        os.rmdir(tmp)

    print(header(f"Pool.map over {args.arrays} arrays of {fmt_size(args.size)}"))
    print()
    print(f"{args.workers} workers ({args.start}), median of {args.reps} maps; heap objects left: {left}")
    print()
    shm_t = rows["shmalloc"]
    print(
        md_table(
            ["variant", "one map (ms)", "per task (µs)", "a task's pickled argument", "against shmalloc"],
            [
                [
                    k,
                    f"{t * 1e3:.1f}",
                    f"{t / args.arrays * 1e6:.0f}",
                    f"{sizes[k]} B",
                    fmt_ratio(t / shm_t),
                ]
                for k, t in rows.items()
            ],
        )
    )
    print()
    r = rows["numpy pickle"] / shm_t
    print(
        f"shmalloc against plain numpy pickling: {r:.1f}x faster (target >= 10x: {'met' if r >= 10 else 'NOT met'})"
    )
    print(
        f"a task's pickled argument: {sizes['shmalloc']} B (target < 1 KiB: {'met' if sizes['shmalloc'] < 1024 else 'NOT met'})"
    )
    print(f"SharedMemory by name / shmalloc: {rows['SharedMemory by name'] / shm_t:.2f}x (time per map)")


if __name__ == "__main__":
    main()
