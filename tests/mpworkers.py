"""Worker bodies for the multi-process tests (importable, so `spawn` children can run them).

Every block is filled with a pattern derived from its handle and verified before it is freed,
so two processes that were handed overlapping blocks fail the verification."""

import signal
import time

from service.demo import run_workload  # noqa: F401 - the workload the demo runs too


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
