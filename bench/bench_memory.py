"""Memory that comes back: the background scavenger, and how the heap reuses what it freed.

    python bench/bench_memory.py [--mb 200] [--rounds 2] [--settle 10] [--seed 1]

One worker (this process) on a real daemon, random sizes from 1 B to 32 KiB, every block filled
with a pattern and verified before it is freed:

  fill          allocate --mb MiB
  free all      free every block; then, "+settled", once the scavenger has come down to its
                retained target (at most --settle seconds)
  fill again    allocate --mb MiB again
  free half     free a random half of the blocks
  refill half   allocate the same volume again, from the same distribution

At each step: heap_sys, heap_inuse, heap_alloc, the segment's resident bytes (st_blocks), the
resident metadata (every region but the heap: what is reserved whole, and SEEK_DATA elsewhere),
heap_inuse/heap_alloc and resident/heap_alloc; then the metadata tmpfs holds reserved
(Arena.metadata: the allocator's books, which the tests hold to st_blocks), split into the
allocation and generation maps' fine parts (a byte each per 8 heap bytes, for the small classes
whose size is no multiple of 128), their coarse parts (per 128), the page map, the span records
in use, the P slots ever claimed and the fixed regions, each as a share of heap_inuse.  The
refill's growth of heap_sys says whether freed room is reused (partly used spans before fresh
ones, as Go's mcentral prefers them).

Two daemons, the scavenger off (--retain 100%: it keeps every idle page) and on (the default
--retain), run round robin in the same run (a fresh daemon each round, the order swapped every
round): alloc latency p99 over the allocations of "fill again" (after the scavenger gave the
room back: its pages are committed again) and of "refill half" (the scavenger at work beside
the allocations), medians over the rounds.
Machines are shared and noisy: compare ratios.
"""

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _benchlib import Session, header, md_table, median, pattern  # noqa: E402

import client  # noqa: E402
from shm import Arena  # noqa: E402

CONFIGS = (("off", ("--retain", "100%")), ("on", ()))  # the scavenger idle / at its default


def fill(heap, nbytes, rnd, lat):
    """Blocks of random sizes (1 B..32 KiB) until `nbytes`, each filled; alloc ns into `lat`."""
    blocks, total = [], 0
    while total < nbytes:
        size = rnd.randint(1, 32 << 10)
        t = time.perf_counter_ns()
        b = heap.alloc(size)
        lat.append(time.perf_counter_ns() - t)
        b.buf[:] = pattern(b.handle, b.size)
        blocks.append(b)
        total += b.size
    return blocks


def free(heap, blocks):
    for b in blocks:
        if bytes(b.buf) != pattern(b.handle, b.size):
            raise AssertionError(f"block {b.handle} ({b.size} bytes) was overwritten")
        heap.free(b)
    return sum(b.size for b in blocks)


def settle(heap, seconds):
    """Wait until the idle heap is down to the retained target; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        s = heap.stats()
        if s["heap_idle"] - s["heap_released"] <= s["retain_target"]:
            break
        time.sleep(0.05)
    return time.monotonic() - t0


def mib(n):
    return f"{n / (1 << 20):.1f} MiB"


def p99(xs):
    xs = sorted(xs)
    return xs[len(xs) * 99 // 100]


def one_run(extra, mb, seed, settle_s):
    rows, lat = [], {"fill again": [], "refill half": []}
    rnd = random.Random(seed)
    with Session(max_heap="1G", extra=extra) as s, client.connect(s.endpoint) as heap:
        arena = Arena.attach(s.arena)

        def sample(step):
            snap = heap.stats()
            res = arena.resident()
            res["books"] = arena.metadata()
            rows.append((step, snap, res))

        try:
            blocks = fill(heap, mb << 20, rnd, [])
            sample("fill")
            free(heap, blocks)
            sample("free all")
            took = settle(heap, settle_s)
            sample(f"free all, +settled ({took:.1f} s)")
            blocks = fill(heap, mb << 20, rnd, lat["fill again"])
            sample("fill again")
            rnd.shuffle(blocks)
            half, blocks = blocks[: len(blocks) // 2], blocks[len(blocks) // 2 :]
            freed = free(heap, half)
            sample("free half")
            blocks += fill(heap, freed, rnd, lat["refill half"])
            sample("refill half")
            free(heap, blocks)
            hold = heap.stats()["scavenge_hold_ns"]
        finally:
            arena.close()
    return rows, {k: p99(v) for k, v in lat.items()}, hold


def pct(n, of):
    return f"{n / of * 100:.2f}%" if of else "-"


def meta_table(rows):
    """The reserved metadata by part, each as a share of heap_inuse."""
    out = []
    for step, s, r in rows:
        m, inuse = r["books"], s["heap_inuse"]
        out.append(
            (
                step,
                mib(inuse),
                pct(m["fine"], inuse),
                pct(m["coarse"], inuse),
                pct(m["pagemap"], inuse),
                pct(m["spans"], inuse),
                pct(m["slots"], inuse),
                pct(m["fixed"], inuse),
                pct(sum(m.values()), inuse),
            )
        )
    return md_table(
        [
            "step",
            "heap_inuse",
            "maps, fine",
            "maps, coarse",
            "page map",
            "span records",
            "P slots",
            "fixed regions",
            "all",
        ],
        out,
    )


def table(rows):
    out = []
    for step, s, r in rows:
        meta = r["meta"] + r["amap"]
        alloc = s["heap_alloc"]
        out.append(
            (
                step,
                mib(s["heap_sys"]),
                mib(s["heap_inuse"]),
                mib(alloc),
                mib(r["total"]),
                mib(meta),
                f"{s['heap_inuse'] / alloc:.3f}" if alloc else "-",
                f"{r['total'] / alloc:.3f}" if alloc else "-",
            )
        )
    return md_table(
        [
            "step",
            "heap_sys",
            "heap_inuse",
            "heap_alloc",
            "resident",
            "metadata",
            "inuse/alloc",
            "resident/alloc",
        ],
        out,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=200, help="MiB of blocks per fill")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the two daemons, round robin")
    ap.add_argument("--settle", type=float, default=10, help="at most this long for the scavenger")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    print(header("Memory: the background scavenger, and reuse of freed room"))
    lat = {name: {"fill again": [], "refill half": []} for name, _ in CONFIGS}
    last = {}
    for rnd in range(args.rounds):
        order = CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]
        for name, extra in order:
            rows, p, hold = one_run(extra, args.mb, args.seed, args.settle)
            for phase, v in p.items():
                lat[name][phase].append(v)
            last[name] = (rows, hold)
    for name, extra in CONFIGS:
        rows, hold = last[name]
        flags = " ".join(extra) or "(default --retain)"
        print(f"\nscavenger {name} {flags}, last round; longest step hold {hold / 1e6:.3f} ms\n")
        print(table(rows))
        print("\nmetadata reserved, as a share of heap_inuse\n")
        print(meta_table(rows))
    print("\nratios\n")
    out = []
    for name, _ in CONFIGS:
        rows, _ = last[name]
        by = {step.split(" (")[0]: (snap, res) for step, snap, res in rows}
        peak = by["fill"][1]["total"]
        settled = by["free all, +settled"][1]["total"]
        before, after = by["free half"][0]["heap_sys"], by["refill half"][0]["heap_sys"]
        heap_res = by["free all, +settled"][1]["heap"] / by["fill"][1]["heap"]
        out.append(
            (
                name,
                f"{settled / peak:.3f}",
                f"{heap_res:.3f}",
                f"{(after - before) / before * 100:+.2f}%",
                f"{median(lat[name]['fill again']) / 1e3:.1f} µs",
                f"{median(lat[name]['refill half']) / 1e3:.1f} µs",
            )
        )
    print(
        md_table(
            [
                "scavenger",
                "resident settled / peak",
                "heap resident settled / peak",
                "heap_sys growth on refill",
                "alloc p99, fill again",
                "alloc p99, refill half",
            ],
            out,
        )
    )
    print()
    for phase in ("fill again", "refill half"):
        off, on = median(lat["off"][phase]), median(lat["on"][phase])
        print(
            f"alloc p99 on / off, {phase}: {on / off:.2f}x  "
            f"(per round, ns: off {lat['off'][phase]}, on {lat['on'][phase]})"
        )


if __name__ == "__main__":
    main()
