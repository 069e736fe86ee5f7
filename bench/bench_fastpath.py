"""Where the time of an alloc+free pair goes: the fast path taken apart.

    python bench/bench_fastpath.py [--n 300000] [--reps 7]

1. A replica of ProcessCache's alloc/free closures (shm/cache.py) over a private buffer, timed
   whole and with one piece at a time removed or swapped: the Block tuple, the owner-thread and
   busy-flag checks, the stop-byte read -- and with a threading.Lock around each call instead of
   the busy flag (the first design).  The differences are what each piece costs.
2. The real refill on a real arena: the collect of a span's 127 freed 64 B objects under its
   central lock, which a pair loop does once every 128 pairs.
3. The real pair in shared mode (after a second thread used the cache), against the owner's.

Prints ns (medians of --reps).  Machines are shared and noisy: compare the rows of one run.
"""

import argparse
import mmap
import os
import sys
import threading
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_alloc import pairs, timed  # noqa: E402 - one timing loop for every bench

from shm.cache import Block  # noqa: E402
from shm.sizeclasses import CLASS_TO_SIZE, SIZE_TO_CLASS  # noqa: E402

TEMPLATE = """
def alloc(size):
    if 0 < size <= 32768{OWNER}:
        c = s2c[(size + 7) >> 3]
        lst = lists[c]
        {ENTER}
        try:
            if lst{STOP}:
                h = lst.pop()
                amap[(h - hb) >> 3] = tag
                return {RESULT}
        finally:
            {LEAVE}
    raise AssertionError("slow path")

def free(b):
    h = {HANDLE}
    if True{OWNER}:
        {ENTER}
        try:
            if True{STOP}:
                d = h - hb
                if not d & mask and amap[d >> 3] == tag:
                    amap[d >> 3] = 0
                    relist(h)
                    return
        finally:
            {LEAVE}
    raise AssertionError("slow path")
"""


def replica(block=True, owner_check=True, stop_check=True, lock=False):
    """alloc/free as in shm/cache.py (the same statements, generated without the removed piece),
    on a private buffer; free re-lists the handle so that no refill ever runs (that is measured
    on its own)."""
    buf = mmap.mmap(-1, 1 << 23)
    c64 = SIZE_TO_CLASS[8]
    lists = [[] for _ in range(67)]
    lists[c64] = list(range(8192, 8192 + 64 * 100_000, 64))[::-1]
    lk = threading.Lock()
    env = dict(
        amap=memoryview(buf)[: 1 << 21],
        stop=memoryview(buf)[1 << 22 : (1 << 22) + 1],
        lists=lists,
        hb=0,
        mask=~((1 << 24) - 1) | 7,
        tag=16,
        busy=[0],
        get_ident=threading.get_ident,
        owner=threading.get_ident(),
        acquire=lk.acquire,
        release=lk.release,
        s2c=SIZE_TO_CLASS,
        c2s=CLASS_TO_SIZE,
        B=Block,
        relist=lists[c64].append,
    )
    code = TEMPLATE.format(
        OWNER=" and get_ident() == owner" if owner_check else "",
        STOP=" and not stop[0]" if stop_check else "",
        ENTER="acquire()" if lock else "busy[0] = 1",
        LEAVE="release()" if lock else "busy[0] = 0",
        RESULT="B((h, size, c2s[c], None))" if block else "h",
        HANDLE="b[0] if b.__class__ is B else b" if block else "b",
    )
    exec(code, env)
    alloc, free = env["alloc"], env["free"]

    def run(n):
        for _ in range(n):
            free(alloc(64))

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args(argv)

    rows = [
        ("replica, as shipped", replica()),
        ("  without the Block tuple (ints)", replica(block=False)),
        ("  without the owner-thread check", replica(owner_check=False)),
        ("  without the stop-byte read", replica(stop_check=False)),
        ("  bare: no Block, no checks", replica(block=False, owner_check=False, stop_check=False)),
        ("  threading.Lock instead of the busy flag", replica(lock=True)),
    ]
    # Round robin: every repetition times every variant, so drift of a shared machine hits
    # them all alike; each row is the median of its repetitions.
    times = {name: [] for name, _ in rows}
    for fn in (f for _, f in rows):
        fn(a.n // 10)
    for _ in range(a.reps):
        for name, fn in rows:
            t = time.perf_counter_ns()
            fn(a.n)
            times[name].append((time.perf_counter_ns() - t) / a.n)
    print(f"{'alloc(64)+free pair (replica, round robin)':45s} {'ns':>7s}")
    for name, _ in rows:
        print(f"{name:45s} {sorted(times[name])[a.reps // 2]:7.0f}")

    from shm import Arena, ProcessCache

    arena = Arena.create(f"shmalloc-bench-{uuid.uuid4().hex[:8]}", 64 << 20, 8)
    try:
        p = ProcessCache(arena)
        c = SIZE_TO_CLASS[8]
        p.free(p.alloc(64))

        r = arena.cached_spans(p.slot)[0][1]
        off, stride, nelems, _, _ = arena.central.starts(r)
        starts = arena.mv[off : off + nelems * stride : stride]
        zeros = bytes(nelems)

        def refills(n):
            for _ in range(n):
                starts[:] = zeros  # as if every object had been handed out and freed back
                p._lists[c].clear()
                with p._lock:
                    p._refill(c)

        t = timed(refills, 2000, a.reps)[0]
        print(f"\n{'refill: collect one 64 B span (128 objects)':45s} {t:7.0f}   = {t / 128:.0f} ns a pair")
        starts.release()
        p._drop_lists()
        owner = timed(pairs(p.alloc, p.free), a.n // 3, a.reps)[0]
        th = threading.Thread(target=lambda: p.free(p.alloc(8)))
        th.start()
        th.join()
        shared = timed(pairs(p.alloc, p.free), a.n // 3, a.reps)[0]
        print(f"{'real pair, owner thread':45s} {owner:7.0f}")
        print(f"{'real pair, shared mode (after a 2nd thread)':45s} {shared:7.0f}")
        p.close()
    finally:
        arena.destroy()


if __name__ == "__main__":
    main()
