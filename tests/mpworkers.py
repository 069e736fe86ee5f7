"""Worker bodies for the multi-process tests (importable, so `spawn` children can run them).

Every block is filled with a pattern derived from its handle and verified before it is freed,
so two processes that were handed overlapping blocks fail the verification."""

import math
import os
import queue
import random
import signal
import time

from conftest import pattern


def log_uniform_size(rnd, lo=1, hi=1 << 20):
    return int(math.exp(rnd.uniform(math.log(lo), math.log(hi + 1)))) or 1


def verify(view_fn, h, size, who):
    got = bytes(view_fn(h, size))
    if got != pattern(h, size):
        raise AssertionError(f"{who}: block {h} ({size} bytes) was overwritten: overlapping blocks")


def run_workload(heap, idx, n_ops, seed, inbox, outbox, progress=None, progress_at=None, sizes=None):
    """Random alloc/free on `heap` (a ProcessCache or client Heap).  A third of the blocks go
    to the next worker, which verifies and frees them.  Returns the counts."""
    rnd = random.Random(seed)
    mine = {}
    mallocs = frees = sent = received = oom = 0
    for i in range(n_ops):
        while True:
            try:
                h, size = inbox.get_nowait()
            except queue.Empty:
                break
            verify(heap.view, h, size, f"worker {idx}")
            heap.free(h)
            frees += 1
            received += 1
        if mine and rnd.random() < 0.45:
            h = rnd.choice(list(mine))
            size = mine.pop(h)
            verify(heap.view, h, size, f"worker {idx}")
            heap.free(h)
            frees += 1
        else:
            size = sizes(rnd) if sizes else log_uniform_size(rnd)
            try:
                b = heap.alloc(size)
            except MemoryError:
                oom += 1
                continue
            b.buf[:] = pattern(b.handle, size)
            mallocs += 1
            if rnd.random() < 1 / 3:
                outbox.put((b.handle, size))
                sent += 1
            else:
                mine[b.handle] = size
        if progress is not None and i == progress_at:
            progress.set()
    for h, size in mine.items():
        verify(heap.view, h, size, f"worker {idx}")
        heap.free(h)
        frees += 1
    return {"idx": idx, "mallocs": mallocs, "frees": frees, "sent": sent, "received": received, "oom": oom,
            "pid": os.getpid()}


def arena_worker(arena_name, idx, n_ops, seed, inbox, outbox, results, progress=None, progress_at=None):
    from shm import Arena, ProcessCache
    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    res = run_workload(p, idx, n_ops, seed, inbox, outbox, progress, progress_at)
    p.close()
    arena.close()
    results.put(res)


def stuck_in_critical_section(arena_name, where, ready):
    """Attach, then stop forever INSIDE an operation -- locks held, undo log half full -- at
    `where` ("heap": after a large allocation's writes; "central": after a refill's collect).
    The test SIGKILLs us there."""
    from shm import Arena, ProcessCache
    from shm.central import CentralList
    from shm.heap import PageHeap
    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)

    def stop_here():
        ready.set()
        while True:
            signal.pause()

    if where == "heap":
        real = PageHeap.alloc_span

        def alloc_span(self, op, *a):
            r = real(self, op, *a)
            stop_here()
            return r
        PageHeap.alloc_span = alloc_span
        p.alloc(100_000)
    else:
        real_collect = CentralList.collect

        def collect(self, op, c, r, k):
            got = real_collect(self, op, c, r, k)
            stop_here()
            return got
        CentralList.collect = collect
        p.alloc(64)
    time.sleep(60)  # not reached
