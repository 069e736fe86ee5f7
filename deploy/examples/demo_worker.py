#!/usr/bin/env python3
"""shmalloc example worker: the smallest useful client of a running daemon.

Installed as ``shmalloc-demo-worker`` by deploy/docker/install.sh (the script's
first line is rewritten to the interpreter it was installed for). Used by
deploy/docker/compose.yaml and deploy/systemd/shmalloc-worker@.service.

Each round it allocates one block per size, writes a pattern into it, reads it
back through ``heap.view(handle)`` (the zero-copy path another process would
use), takes a consistent snapshot while the blocks are live, prints one JSON
line, and frees the blocks. Only the client library's public API is used
(client.connect, Heap.alloc, view, stats and free: see client/__init__.py).

Exit status: 0 after the last round or on SIGTERM/SIGINT (the P slot is given
back through ``close()``), 1 if a block did not read back what was written or
a snapshot is not consistent, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shmalloc-demo-worker",
        description="Connect to a shmalloc daemon, allocate, write, read back, print stats.",
    )
    p.add_argument(
        "--endpoint",
        default=None,
        help="control endpoint (default: $SHMALLOC_ENDPOINT, else the client's default)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="number of rounds; 0 = run until SIGTERM/SIGINT (default: 1)",
    )
    p.add_argument("--interval", type=float, default=1.0, help="seconds between rounds (default: 1)")
    p.add_argument(
        "--sizes",
        default="64,1000,40000",
        help="comma-separated block sizes in bytes; >32768 is a large object (default: 64,1000,40000)",
    )
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        p.error(f"--sizes: not a list of integers: {args.sizes!r}")
    if not args.sizes or min(args.sizes) <= 0:
        p.error("--sizes: every size must be a positive integer")
    if args.rounds < 0:
        p.error("--rounds must be >= 0")
    if args.interval < 0:
        p.error("--interval must be >= 0")
    return args


def _stop(signum: int, frame: object) -> None:
    # Turn SIGTERM into SystemExit so that the `with` block below closes the
    # heap and the daemon gets the P slot back at once (not after a timeout).
    raise SystemExit(0)


def one_round(heap, sizes: list[int], round_no: int) -> dict:
    pid = os.getpid()
    blocks = []
    try:
        for i, size in enumerate(sizes):
            blk = heap.alloc(size)
            blocks.append(blk)
            pattern = bytes([(pid + round_no + i) % 251]) * size
            blk.buf[:size] = pattern
            if bytes(heap.view(blk.handle)[:size]) != pattern:
                raise RuntimeError(f"block {blk.handle:#x} ({size} B) did not read back")
        snap = heap.stats()
        if not snap.get("consistent", False):
            raise RuntimeError(f"snapshot not consistent: {snap!r}")
        return {
            "pid": pid,
            "round": round_no,
            "handles": [blk.handle for blk in blocks],
            "epoch": snap.get("epoch"),
            "num_p": snap.get("num_p"),
            "heap_alloc": snap["heap_alloc"],
            "heap_objects": snap["heap_objects"],
            "sys": snap["sys"],
            "pause_ns": snap.get("pause_ns"),
        }
    finally:
        for blk in blocks:
            heap.free(blk)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)

    import client  # imported late: --help works without the package

    heap = client.connect(args.endpoint) if args.endpoint else client.connect()
    try:
        with heap:
            round_no = 0
            while args.rounds == 0 or round_no < args.rounds:
                if round_no:
                    time.sleep(args.interval)
                print(json.dumps(one_round(heap, args.sizes, round_no)), flush=True)
                round_no += 1
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(f"shmalloc-demo-worker: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
