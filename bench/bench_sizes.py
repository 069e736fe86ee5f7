"""The cost of an alloc+free pair against the block size, shmalloc and its peers, in one process.

    python bench/bench_sizes.py [--sizes 1,64,4K,32K,256K,1M,16M,64M] [--reps 7] [--seconds 60] [--quick]

One process; a private daemon (`--max-heap 2G`) in a temp dir.  Rows, each an allocate + release
of n bytes, nothing written (ns per pair):
  shmalloc block     heap.alloc(n) + heap.free(block), through a client.Heap connected to the daemon
  shmalloc handle    heap.alloc(n) + heap.free(block.handle)
  iceoryx2           publisher.loan_slice_uninit(n) + assume_init().send() + subscriber.receive()
                     + sample.delete(): a publish-subscribe round trip in this one process, on a
                     Slice[c_uint8] service whose publisher's initial_max_slice_len is the largest
                     size (64 MiB) -- a Static allocation strategy: every chunk that large
                     (skipped if iceoryx2 is not installed)
  mp.heap            multiprocessing.heap.BufferWrapper(n), dropped at once (its finalizer frees it)
  SharedMemory       multiprocessing.shared_memory.SharedMemory(create=True, size=n) + close() + unlink():
                     one segment per object, the stdlib way
  bytearray          bytearray(n): private memory, zeroed (so it touches every page): a floor for the
                     small sizes only

Method: every (size, row) cell is timed once per repetition, all cells round robin within each
repetition (the row order rotates from one repetition to the next); each figure is the median of
--reps repetitions.  A cell's iteration count is calibrated once (before the repetitions) so
that one timed run takes about --seconds / (cells x (reps + 1)): a whole run takes about
--seconds (default 60; --quick: 3 repetitions, 4 seconds).  64 B is always measured: it is the
reference of the size ratio.

Prints two markdown tables: ns per pair (medians), then per size the ratios
  shmalloc/iceoryx2      target <= 1 at every size (shmalloc no dearer than iceoryx2's loan)
  shmalloc/mp.heap, shmalloc/SharedMemory   (below 1: shmalloc cheaper)
  shmalloc(n)/shmalloc(64 B)   target <= 2 at every size (a pair's cost flat in the size)
-- the shmalloc figure is the `shmalloc block` row.  Machines are shared and noisy: read the
ratios of one run, and the medians of several runs; never a bare time.
"""

import argparse
import ctypes
import gc
import os
import sys
import time
from multiprocessing import heap as mp_heap
from multiprocessing import shared_memory

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import (  # noqa: E402
    Session,
    fmt_num,
    fmt_ratio,
    fmt_size,
    have,
    header,
    md_table,
    median,
    parse_sizes,
    ratio,
    skipped,
)

DEFAULT_SIZES = "1,64,4K,32K,256K,1M,16M,64M"


# ---------------------------------------------------------------------------------------------
# the rows: each a function make(n) -> run(k), which does k pairs of size n


def shmalloc_block(heap):
    alloc, free = heap.alloc, heap.free

    def make(n):
        def run(k):
            for _ in range(k):
                free(alloc(n))

        return run

    return make


def shmalloc_handle(heap):
    alloc, free = heap.alloc, heap.free

    def make(n):
        def run(k):
            for _ in range(k):
                free(alloc(n).handle)

        return run

    return make


class Iceoryx2:
    """A publisher and a subscriber of one Slice[c_uint8] service, in this process."""

    def __init__(self, session, max_len):
        import iceoryx2 as iox2

        iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
        prefix, root = session.iceoryx2_config()
        cfg = iox2.config.default()
        cfg.global_cfg.prefix = iox2.FileName.new(prefix)
        cfg.global_cfg.root_path = iox2.Path.new(root)
        self.node = (
            iox2.NodeBuilder.new()
            .config(cfg)
            .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
            .create(iox2.ServiceType.Ipc)
        )
        self.service = (
            self.node.service_builder(iox2.ServiceName.new(f"bench_sizes_{os.getpid()}"))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .max_publishers(1)
            .max_subscribers(1)
            .create()
        )
        self.pub = (
            self.service.publisher_builder()
            .initial_max_slice_len(max_len)
            .allocation_strategy(iox2.AllocationStrategy.Static)
            .create()
        )
        self.sub = self.service.subscriber_builder().create()

    def make(self, n):
        loan, receive = self.pub.loan_slice_uninit, self.sub.receive

        def run(k):
            for _ in range(k):
                loan(n).assume_init().send()
                receive().delete()

        return run

    def close(self):
        for x in ("sub", "pub"):
            obj = getattr(self, x, None)
            if obj is not None:
                obj.delete()
        self.sub = self.pub = self.service = self.node = None
        gc.collect()


def mp_heap_row(n):
    bw = mp_heap.BufferWrapper

    def run(k):
        for _ in range(k):
            bw(n)

    return run


def shared_memory_row(prefix):
    seq = [0]

    def make(n):
        def run(k):
            base = seq[0]
            seq[0] += k
            for i in range(base, base + k):
                s = shared_memory.SharedMemory(name=f"{prefix}s{i}", create=True, size=n)
                s.close()
                s.unlink()

        return run

    return make


def bytearray_row(n):
    def run(k):
        for _ in range(k):
            bytearray(n)

    return run


# ---------------------------------------------------------------------------------------------


def calibrate(run, budget_s, min_iters=3, max_iters=2_000_000):
    """Iterations for one timed run of about budget_s (and one warm-up)."""
    run(1)
    k = 1
    while True:
        t = time.perf_counter()
        run(k)
        dt = time.perf_counter() - t
        if dt >= budget_s / 8 or k >= max_iters:
            return max(min_iters, min(max_iters, int(k * budget_s / max(dt, 1e-9))))
        k *= 4 if dt < budget_s / 64 else 2


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes", default=DEFAULT_SIZES, help=f"comma-separated, K/M suffixes (default {DEFAULT_SIZES})"
    )
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 7; --quick 3)")
    ap.add_argument(
        "--seconds", type=float, default=None, help="the whole run's time budget (default 60; --quick 4)"
    )
    ap.add_argument("--max-heap", default="2G")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 7)
    seconds = args.seconds or (4.0 if args.quick else 60.0)
    sizes = sorted(set(parse_sizes(args.sizes)) | {64})

    print(header("bench_sizes: alloc+free pair against the block size"), flush=True)
    print()
    import client

    with Session(args.max_heap) as session, client.connect(session.endpoint) as heap:
        rows = {"shmalloc block": shmalloc_block(heap), "shmalloc handle": shmalloc_handle(heap)}
        iox = None
        if have("iceoryx2"):
            iox = Iceoryx2(session, max(sizes))
            rows["iceoryx2"] = iox.make
        else:
            skipped("iceoryx2")
        rows["mp.heap"] = mp_heap_row
        rows["SharedMemory"] = shared_memory_row(session.prefix)
        rows["bytearray"] = bytearray_row
        try:
            names = list(rows)
            cells = [(n, r) for n in sizes for r in names]
            budget = seconds / (len(cells) * (reps + 1))
            runs, iters = {}, {}
            for n, r in cells:
                runs[n, r] = rows[r](n)
                iters[n, r] = calibrate(runs[n, r], budget)
            times = {c: [] for c in cells}
            t_all = time.perf_counter()
            for rep in range(reps):
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for n in sizes:
                    for r in order:
                        k = iters[n, r]
                        t = time.perf_counter_ns()
                        runs[n, r](k)
                        times[n, r].append((time.perf_counter_ns() - t) / k)
            t_all = time.perf_counter() - t_all
        finally:
            if iox is not None:
                iox.close()

    med = {c: median(v) for c, v in times.items()}
    print(f"ns per pair, median of {reps} repetitions (round robin; {t_all:.0f} s of timed runs):")
    print()
    print(md_table(["size"] + names, [[fmt_size(n)] + [fmt_num(med[n, r]) for r in names] for n in sizes]))
    print()
    ref = med[64, "shmalloc block"]
    ratio_rows, flat_ok, iox_ok = [], 0, 0
    for n in sizes:
        s = med[n, "shmalloc block"]
        r_iox = ratio(s, med.get((n, "iceoryx2")))
        r_flat = ratio(s, ref)
        flat_ok += r_flat <= 2
        iox_ok += r_iox is not None and r_iox <= 1
        ratio_rows.append(
            [
                fmt_size(n),
                fmt_ratio(r_iox),
                fmt_ratio(ratio(s, med[n, "mp.heap"])),
                fmt_ratio(ratio(s, med[n, "SharedMemory"])),
                fmt_ratio(r_flat),
            ]
        )
    print("ratios of medians (shmalloc = the `shmalloc block` row):")
    print()
    print(
        md_table(
            [
                "size",
                "shmalloc / iceoryx2",
                "shmalloc / mp.heap",
                "shmalloc / SharedMemory",
                "shmalloc(n) / shmalloc(64 B)",
            ],
            ratio_rows,
        )
    )
    print()
    print(f"target shmalloc(n) <= 2x shmalloc(64 B): met at {flat_ok} of {len(sizes)} sizes")
    if iox is not None:
        print(f"target shmalloc <= iceoryx2: met at {iox_ok} of {len(sizes)} sizes")
    print()
    print("iterations per timed run (calibrated):")
    print()
    print(md_table(["size"] + names, [[fmt_size(n)] + [fmt_num(iters[n, r]) for r in names] for n in sizes]))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
