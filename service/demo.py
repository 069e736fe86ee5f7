"""`shmalloc demo`: the daemon, a few worker processes on it, snapshots while they run, and a
final consistent snapshot.  The workload here is also the one the multi-process tests run.

Each worker allocates random sizes from 1 B to 1 MiB (log-uniform, so every size class is hit),
fills each block with a pattern derived from its handle, hands a third of its blocks to the next
worker (by handle, through a queue), and verifies every block before freeing it -- so two
processes handed overlapping blocks would fail.
"""

import math
import multiprocessing as mp
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import time


def pattern(handle, n):
    """The bytes written into a block: derived from its handle, so overlapping blocks cannot
    both verify."""
    seed = (handle * 2654435761) & 0xFFFFFFFF
    unit = seed.to_bytes(4, "little") + (handle & 0xFFFFFFFF).to_bytes(4, "little")
    return (unit * (n // 8 + 1))[:n]


def log_uniform_size(rnd, lo=1, hi=1 << 20):
    return int(math.exp(rnd.uniform(math.log(lo), math.log(hi + 1)))) or 1


def verify(heap, h, size, who):
    if bytes(heap.view(h, size)) != pattern(h, size):
        raise AssertionError(f"{who}: block {h} ({size} bytes) was overwritten: overlapping blocks")


def run_workload(
    heap,
    idx,
    n_ops,
    seed,
    inbox,
    outbox,
    progress=None,
    progress_at=None,
    sizes=None,
    free_ratio=0.45,
    until=None,
):
    """Random alloc/free on `heap` (a ProcessCache or a client Heap); a third of the blocks go
    to `outbox`, blocks from `inbox` are verified and freed.  `n_ops` operations, or with
    `until` (an Event) at least n_ops and then until it is set.  Returns the counts."""
    rnd = random.Random(seed)
    mine = {}
    mallocs = frees = sent = received = oom = 0
    i = -1
    while True:
        i += 1
        if i >= n_ops and (until is None or until.is_set()):
            break
        while True:
            try:
                h, size = inbox.get_nowait()
            except queue.Empty:
                break
            verify(heap, h, size, f"worker {idx}")
            heap.free(h)
            frees += 1
            received += 1
        if mine and rnd.random() < free_ratio:
            h = rnd.choice(list(mine))
            size = mine.pop(h)
            verify(heap, h, size, f"worker {idx}")
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
        verify(heap, h, size, f"worker {idx}")
        heap.free(h)
        frees += 1
    return {
        "idx": idx,
        "mallocs": mallocs,
        "frees": frees,
        "sent": sent,
        "received": received,
        "oom": oom,
        "pid": os.getpid(),
    }


def client_worker(
    endpoint, idx, n_ops, seed, inbox, outbox, results, progress=None, progress_at=None, until=None
):
    """A worker process: connect to the daemon as a P and run the workload."""
    import client

    with client.connect(endpoint) as heap:
        res = run_workload(heap, idx, n_ops, seed, inbox, outbox, progress, progress_at, until=until)
    results.put(res)


def drain(q, heap):
    n = 0
    while True:
        try:
            h, size = q.get(timeout=0.2)
        except queue.Empty:
            return n
        verify(heap, h, size, "demo")
        heap.free(h)
        n += 1


def daemon_command(endpoint, max_heap, extra=()):
    """The command line of a `shmalloc daemon` of this interpreter on `endpoint`."""
    return [
        sys.executable,
        "-m",
        "service",
        "daemon",
        "--endpoint",
        endpoint,
        "--max-heap",
        str(max_heap),
        *extra,
    ]


def start_daemon(endpoint, max_heap, extra=()):
    proc = subprocess.Popen(daemon_command(endpoint, max_heap, extra))
    import client

    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping(endpoint, 200)
            return proc
        except client.DaemonUnavailable:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"daemon did not start (exit {proc.returncode})") from None


def run(args):
    import client
    from shm.stats import identities, monotonic

    from . import render

    tmp = tempfile.mkdtemp(prefix="shmalloc-demo-")
    endpoint = f"ipc://{tmp}/control.sock"
    print(f"demo: starting the daemon on {endpoint}", flush=True)
    daemon = start_daemon(endpoint, args.max_heap)
    ctx = mp.get_context("spawn")
    try:
        boxes = [ctx.Queue() for _ in range(args.workers)]
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=client_worker,
                args=(endpoint, i, args.ops, 1000 + i, boxes[i], boxes[(i + 1) % args.workers], results),
            )
            for i in range(args.workers)
        ]
        for p in procs:
            p.start()
        print(
            f"demo: {args.workers} workers x {args.ops} random alloc/free (1 B .. 1 MiB, a third freed "
            "by another process); snapshots while they run:",
            flush=True,
        )
        prev, taken, pauses = None, 0, []
        while any(p.is_alive() for p in procs):
            snap = client.stats(endpoint)
            bad = identities(snap) + (monotonic(prev, snap) if prev else [])
            if bad or not snap["consistent"]:
                raise AssertionError(f"snapshot {snap['epoch']} is wrong: {bad or snap['unflushed']}")
            taken += 1
            pauses.append(snap["pause_ns"])
            prev = snap
            time.sleep(0.1)
        res = [results.get(timeout=60) for _ in procs]
        for p in procs:
            p.join()
        with client.connect(endpoint) as heap:
            for box in boxes:
                drain(box, heap)
        final = client.stats(endpoint, slow=True)
        pauses.sort()
        print(
            f"demo: {taken} snapshots while running, every one consistent; pause median "
            f"{pauses[len(pauses) // 2] / 1e6:.2f} ms, max {pauses[-1] / 1e6:.2f} ms"
            if pauses
            else "",
            flush=True,
        )
        print(
            f"demo: workers did {sum(r['mallocs'] for r in res)} mallocs, "
            f"{sum(r['received'] for r in res)} blocks freed by another process",
            flush=True,
        )
        print(render.stats_table(final, top=12))
        chk = client.check(endpoint)
        print(f"check: {'OK' if not chk['problems'] else chk['problems']}")
        return 0 if not chk["problems"] and final["consistent"] else 1
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(30)
        print(f"demo: daemon stopped (exit {code})")
        try:
            os.rmdir(tmp)
        except OSError:
            pass
