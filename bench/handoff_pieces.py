"""Where a hand-off message's time goes: bench_handoff.py's "shmalloc batched" loops, each piece
timed on its own side.

    python bench/handoff_pieces.py [--size 256K] [--messages N] [--runs 3]

Not a comparison with the peers (bench_handoff.py is): a diagnostic of this allocator's share.
One producer and one consumer process (spawn) on a bare arena (no daemon: its own segment,
removed at the end), the flow control of bench_handoff.py (batches of B = min(256, 16 MiB / size)
handles over a multiprocessing Pipe, the producer at most 4B messages ahead).  Per message the
producer times `heap.alloc(size)` with `block.buf` (alloc), the fill (2 slice assignments), and
its waits for the consumer's acks; the consumer times `heap.view(handle, size)` (view), zlib.crc32
over the message (read), `heap.free(handle)` (free, a cross-process free: the fast path and its
share of the buffer's applies), the Pipe's recv of each batch but the first (recv: its waits
too) and its acks (ack), its clock started when the first batch arrived.  Prints microseconds a
message, each side's rate, and the median of --runs runs (perf_counter around each piece: the
timer's own cost, about 0.1 us a call, is in every figure).
"""

import argparse
import os
import sys
import time
import uuid
import zlib
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import count_calls, header, md_table, median, parse_size  # noqa: E402


def producer(name, size, n, conn, ack, out):
    from shm import Arena, ProcessCache

    arena = Arena.attach(name)
    heap, pc = ProcessCache(arena), time.perf_counter
    slow = count_calls(heap, "_alloc_locked")
    B = min(256, (16 << 20) // size)
    tail, hs, inflight, t_alloc, t_fill, t_wait = bytes(size - 8), array("Q"), 0, 0.0, 0.0, 0.0
    t0 = pc()
    for seq in range(n):
        if inflight >= 4 * B:
            a = pc()
            ack.recv_bytes()
            t_wait += pc() - a
            inflight -= B
        a = pc()
        b = heap.alloc(size)
        mv = b.buf
        c = pc()
        mv[:8] = seq.to_bytes(8, "little")
        mv[8:] = tail
        t_fill += pc() - c
        t_alloc += c - a
        hs.append(b.handle)
        inflight += 1
        if len(hs) == B:
            conn.send_bytes(hs)
            hs = array("Q")
    conn.send_bytes(hs)
    conn.send_bytes(b"")
    t1 = pc()
    del mv, b
    while ack.recv_bytes() != b"E":
        pass
    out.put(
        {
            "producer msg/s": n / (t1 - t0),
            "alloc": t_alloc,
            "alloc: slow path": slow[1] / 1e9,
            "alloc: slow paths taken": slow[0],
            "fill": t_fill,
            "ack waits": t_wait,
        }
    )
    heap.close()
    arena.close()


def consumer(name, size, n, conn, ack, out):
    from shm import Arena, ProcessCache

    arena = Arena.attach(name)
    heap, pc = ProcessCache(arena), time.perf_counter
    slow, applies = count_calls(heap, "_free_locked"), count_calls(arena, "apply_buffered_frees")
    B = min(256, (16 << 20) // size)
    view, free, crc = heap.view, heap.free, zlib.crc32(bytes(size - 8))
    t_view = t_read = t_free = t_recv = t_ack = 0.0
    seq, t0 = 0, None
    while True:
        a = pc()
        data = conn.recv_bytes()
        if t0 is None:
            t0 = pc()  # from the first batch's arrival: the producer's start is not the consumer's
        else:
            t_recv += pc() - a
        if not data:
            break
        hs = array("Q")
        hs.frombytes(data)
        for h in hs:
            a = pc()
            mv = view(h, size)
            b = pc()
            if zlib.crc32(mv[8:]) != crc or int.from_bytes(mv[:8], "little") != seq:
                raise AssertionError(f"message {seq}: wrong bytes")
            c = pc()
            mv.release()
            free(h)
            d = pc()
            t_view += b - a
            t_read += c - b
            t_free += d - c
            seq += 1
            if seq % B == 0:
                a = pc()
                ack.send_bytes(b"a")
                t_ack += pc() - a
    t1 = pc()
    if seq != n:
        raise AssertionError(f"{seq} messages of {n}")
    ack.send_bytes(b"E")
    out.put(
        {
            "consumer msg/s": n / (t1 - t0),
            "view": t_view,
            "read": t_read,
            "free": t_free,
            "free: slow path": slow[1] / 1e9,
            "free: slow paths taken": slow[0],
            "free: buffer applies": applies[1] / 1e9,
            "free: buffer applies made": applies[0],
            "recv": t_recv,
            "ack": t_ack,
        }
    )
    heap.close()
    arena.close()


def one_run(size, n):
    import multiprocessing as mp

    from shm import Arena

    name = "pieces" + uuid.uuid4().hex[:8]
    arena = Arena.create(name, heap_max=2 << 30, nslots=4)
    try:
        ctx = mp.get_context("spawn")
        data_r, data_w = ctx.Pipe(False)
        ack_r, ack_w = ctx.Pipe(False)
        out = ctx.Queue()
        procs = [
            ctx.Process(target=consumer, args=(name, size, n, data_r, ack_w, out)),
            ctx.Process(target=producer, args=(name, size, n, data_w, ack_r, out)),
        ]
        for p in procs:
            p.start()
        got = {}
        for _ in procs:
            got.update(out.get(timeout=600))
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError(f"{p.name} exited with {p.exitcode}")
        return got
    finally:
        arena.destroy()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="256K")
    ap.add_argument(
        "--messages", type=int, default=None, help="a run's messages (default 20 000; 2 000 over 256 KiB)"
    )
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    size = parse_size(args.size)
    n = args.messages or (20000 if size <= 256 << 10 else 2000)
    print(header(f"hand-off pieces, {size} B messages, {n} a run"))
    print()
    runs = [one_run(size, n) for _ in range(args.runs)]
    rows = []
    for side, pieces in (
        ("producer", ("alloc", "alloc: slow path", "alloc: slow paths taken", "fill", "ack waits")),
        (
            "consumer",
            (
                "view",
                "read",
                "free",
                "free: slow path",
                "free: slow paths taken",
                "free: buffer applies",
                "free: buffer applies made",
                "recv",
                "ack",
            ),
        ),
    ):
        for piece in pieces:
            m = median([r[piece] for r in runs]) / n
            rows.append(
                [
                    side,
                    piece,
                    f"{m * 1000:.1f} in 1000" if piece.endswith(("taken", "made")) else f"{m * 1e6:.2f}",
                ]
            )
        rate = median([r[f"{side} msg/s"] for r in runs])
        rows.append([side, "messages a second", f"{rate:,.0f}".replace(",", " ")])
    print(md_table(["side", "piece", "µs a message (median of runs)"], rows))


if __name__ == "__main__":
    main()
