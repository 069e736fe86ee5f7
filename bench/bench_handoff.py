"""Producer -> consumer hand-off of whole messages between two processes, shmalloc and its peers.

    python bench/bench_handoff.py [--sizes 64,4K,256K,4M] [--rows ...] [--reps 3] [--seconds 1]
                                  [--time-reads] [--quick]

A private daemon (`--max-heap 2G`) in a temp dir; one producer and one consumer process
(multiprocessing, spawn), started once and driven by the parent.  Per message the producer
makes a message of the size -- its 8-byte sequence number, then a fixed pattern -- and hands it
over; the consumer reads every byte (zlib.crc32 over the pattern: one C call; the sequence
number compared) and releases it.  A wrong byte or a lost message stops the run.  A cell (one
row, one size) runs for --seconds (default 1; --quick 0.2); its rate is messages / (the
consumer's last release - the producer's start).  All cells are timed round robin within each
repetition (the row order rotates); figures are medians of --reps (default 3; --quick 1).
--time-reads also times each consumer's read alone (the same crc32 in every row) and prints it
beside what the rest of a message costs: the row's own work and its waits.

Flow control is the same for every Pipe row: the consumer acks every B messages (B =
min(256, 16 MiB / size): 256, 256, 64, 4 for the default sizes) and the producer stays at most
4B messages ahead (shmalloc blocks and SharedMemory segments would otherwise pile up).

Rows (msg/s):
  shmalloc channel   a channel in the heap (heap.channel(4B): a ring of 4B handles, no Pipe):
                     producer: mv = ch.loan(size) (a new block in the next slot), fill, ch.commit();
                     consumer: mv = rx.recv(), read, rx.release(); the producer frees each released
                     block itself (a local free) at a later loan.  A full or empty ring is looked
                     at again after sleep(0) (64 times, as iceoryx2's producer does), then after
                     sleeps doubling up to 1 ms; the ring (4B) is the window
  shmalloc batched   producer: heap.alloc(size), block.buf filled (2 slice assignments), the
                     handles sent B at a time (array('Q') bytes over a multiprocessing Pipe);
                     consumer: heap.view(handle, size), read, heap.free(handle): a cross-process free
  shmalloc 1/msg     the same, one handle (8 bytes) per Pipe message
  pickle             producer: bytes(seq + pattern); conn.send(msg) (pickled); consumer: conn.recv()
  SharedMemory       producer: SharedMemory(create=True, size) + fill + close(), its sequence number
                     over the Pipe; consumer: SharedMemory(name) + read + close() + unlink()
  iceoryx2 batched   publish-subscribe, Slice[c_uint8] service per size (initial_max_slice_len = size,
                     no safe overflow, RetryUntilDelivered backpressure, subscriber buffer 4B):
                     producer: loan_slice_uninit(size) + fill + assume_init().send(), an event
                     notify() every B messages; consumer: WAITS on an iceoryx2 event Listener
                     (timed_wait, no polling), then receive()s until empty: read + sample.delete().
                     The payload memoryview is made from payload_ptr with one cached ctypes array
                     type (what Slice.as_memory_view does, minus ~1 us of per-call setup).
                     iceoryx2 0.10's send() does not wait when the subscriber's buffer is full
                     (RetryUntilDelivered notwithstanding): it returns 0 and drops the sample.  So
                     the producer checks it, and on 0 notifies, yields (sleep(0)) and makes the
                     message again -- the buffer (4B) is the window, as for the Pipe rows
  iceoryx2 1/msg     the same, notify() after every message
  ray                Ray object store (ray.init(num_cpus=1), a 200 MiB store, two actors of 0 CPU):
                     producer actor: ray.put(numpy uint8 array of the message), the ObjectRefs sent
                     B at a time to the consumer actor (at most 4 batches in flight), which ray.get()s
                     them (zero-copy numpy views) and reads them.  Ray starts in seconds; ~ms per message.
Peers not installed are skipped (iceoryx2, ray: pip install -e '.[bench]').

Prints msg/s (medians) per size and row, then the ratios of medians:
  shmalloc channel, batched, 1/msg / pickle                     target: > 1 at every size
  shmalloc channel, batched / iceoryx2 batched, 1/msg / 1/msg   target: >= 0.67 (within 1.5x) up to
                                                               4 KiB, at least level (>= 1) from 256 KiB
Machines are shared and noisy: read the ratios of one run, never a bare rate.
"""

import argparse
import ctypes
import os
import sys
import time
import zlib
from array import array

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _benchlib import (  # noqa: E402
    Session,
    WorkerError,
    call,
    child_init,
    fmt_num,
    fmt_ratio,
    fmt_size,
    have,
    header,
    md_table,
    median,
    parse_sizes,
    ratio,
    serve,
    skipped,
)

DEFAULT_SIZES = "64,4K,256K,4M"
ALL_ROWS = [
    "shmalloc channel",
    "shmalloc batched",
    "shmalloc 1/msg",
    "pickle",
    "SharedMemory",
    "iceoryx2 batched",
    "iceoryx2 1/msg",
    "ray",
]
WINDOW_BATCHES = 4


def batch_of(size):
    return min(256, max(1, (16 << 20) // size))


def tail_of(size):
    """The message after its 8-byte sequence number: a fixed pattern."""
    unit = bytes((i * 131 + 7) & 255 for i in range(251))
    return (unit * ((size - 8) // 251 + 1))[: size - 8]


def bad_message(seq, got):
    raise AssertionError(f"message {seq}: wrong content (sequence number {got})")


# ---------------------------------------------------------------------------------------------
# the producer and consumer processes


class State:
    def __init__(self, endpoint, ctl, link, iox_cfg):
        import client

        self.heap = client.connect(endpoint)
        self.ctl, self.link = ctl, link
        self.iox_cfg = iox_cfg
        self.iox_node = None
        self.iox = {}  # size -> (publisher or subscriber, notifier or listener)
        self.tails = {}

    def tail(self, size):
        if size not in self.tails:
            t = tail_of(size)
            self.tails[size] = (t, zlib.crc32(t))
        return self.tails[size]

    def ready(self, wait_start):
        self.ctl.send(("ready", None))
        if wait_start:
            t0 = self.ctl.recv()
            while time.perf_counter() < t0:
                pass
        return time.perf_counter()

    # -- iceoryx2: one publish-subscribe service and one event service per size, kept for the run
    def iox_ports(self, size, role, buffer):
        key = (size, role)
        if key in self.iox:
            return self.iox[key]
        import iceoryx2 as iox2

        if self.iox_node is None:
            iox2.set_log_level_from_env_or(iox2.LogLevel.Error)
            prefix, root = self.iox_cfg[:2]
            cfg = iox2.config.default()
            cfg.global_cfg.prefix = iox2.FileName.new(prefix)
            cfg.global_cfg.root_path = iox2.Path.new(root)
            self.iox_node = (
                iox2.NodeBuilder.new()
                .config(cfg)
                .signal_handling_mode(iox2.SignalHandlingMode.Disabled)
                .create(iox2.ServiceType.Ipc)
            )
        node = self.iox_node
        svc = (
            node.service_builder(iox2.ServiceName.new(f"handoff/{size}"))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .max_publishers(1)
            .max_subscribers(1)
            .subscriber_max_buffer_size(buffer)
            .enable_safe_overflow(False)
            .open_or_create()
        )
        ev = node.service_builder(iox2.ServiceName.new(f"handoff/{size}/event")).event().open_or_create()
        if role == "producer":
            port = (
                svc.publisher_builder()
                .initial_max_slice_len(size)
                .allocation_strategy(iox2.AllocationStrategy.Static)
                .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
                .create()
            )
            other = ev.notifier_builder().create()
        else:
            port = svc.subscriber_builder().create()
            other = ev.listener_builder().create()
        self.iox[key] = (port, other, svc, ev, ctypes.c_ubyte * size, iox2.Duration.from_millis(50))
        return self.iox[key]

    def close(self):
        for port, other, *_ in self.iox.values():
            port.delete()
            other.delete()
        self.iox.clear()
        self.iox_node = None
        self.heap.close()


def produce(st, row, size, seconds, cell):
    link = st.link
    tail, _ = st.tail(size)
    B = batch_of(size)
    window = WINDOW_BATCHES * B
    seq = acked = 0
    if row.startswith("iceoryx2"):
        pub, notifier, _, _, T, _ = st.iox_ports(size, "producer", window)
        loan, notify, yield_cpu = pub.loan_slice_uninit, notifier.notify, time.sleep
        every = B if row == "iceoryx2 batched" else 1

        def put(seq):
            smp = loan(size)
            mv = memoryview(T.from_address(smp.payload_ptr)).cast("B")
            mv[:8] = seq.to_bytes(8, "little")
            mv[8:] = tail
            mv.release()
            return smp.assume_init().send()  # the number of subscribers it reached

        retries = 0
        t_start = st.ready(True)
        t_end = t_start + seconds
        while True:
            # A full subscriber buffer: send() returns 0 and drops the sample (it does not wait,
            # RetryUntilDelivered notwithstanding): wake the consumer, yield, make it again.
            while not put(seq):
                notify()
                yield_cpu(0)
                retries += 1
            seq += 1
            if seq % every == 0:
                notify()
            if time.perf_counter() >= t_end:
                break
        while not loan(0).assume_init().send():  # the end marker: an empty message
            notify()
            yield_cpu(0)
        notify()
        return {"t_start": t_start, "count": seq, "retries": retries}

    recv_ack, send_bytes = link.recv_bytes, link.send_bytes
    t_start = st.ready(True)
    t_end = t_start + seconds
    if row == "shmalloc channel":
        ch = st.heap.channel(window)
        send_bytes(ch.handle.to_bytes(8, "little"))
        loan, commit = ch.loan, ch.commit
        while True:
            mv = loan(size)  # a new block in the next slot; waits while `window` are in flight
            mv[:8] = seq.to_bytes(8, "little")
            mv[8:] = tail
            commit()
            seq += 1
            if time.perf_counter() >= t_end:
                break
        loan(0)  # the end: an empty message
        commit()
        while recv_ack() != b"E":  # the consumer has closed its end
            pass
        ch.close()  # frees what is left, and the ring
        return {"t_start": t_start, "count": seq}
    if row.startswith("shmalloc"):
        alloc = st.heap.alloc
        batched = row == "shmalloc batched"
        hs = array("Q")
        while True:
            if seq - acked >= window:
                recv_ack()
                acked += B
            b = alloc(size)
            mv = b.buf
            mv[:8] = seq.to_bytes(8, "little")
            mv[8:] = tail
            seq += 1
            if batched:
                hs.append(b.handle)
                if len(hs) == B:
                    send_bytes(hs)
                    hs = array("Q")
            else:
                send_bytes(b.handle.to_bytes(8, "little"))
            if time.perf_counter() >= t_end:
                break
        if hs:
            send_bytes(hs)
        send_bytes(b"")
    elif row == "pickle":
        send = link.send
        while True:
            if seq - acked >= window:
                recv_ack()
                acked += B
            send(seq.to_bytes(8, "little") + tail)
            seq += 1
            if time.perf_counter() >= t_end:
                break
        send(None)
    elif row == "SharedMemory":
        from multiprocessing.shared_memory import SharedMemory

        prefix = f"{st.iox_cfg[2]}m{cell}_"
        while True:
            if seq - acked >= window:
                recv_ack()
                acked += B
            shm = SharedMemory(name=f"{prefix}{seq}", create=True, size=size)
            buf = shm.buf
            buf[:8] = seq.to_bytes(8, "little")
            buf[8:size] = tail
            del buf
            shm.close()
            send_bytes(seq.to_bytes(8, "little"))
            seq += 1
            if time.perf_counter() >= t_end:
                break
        send_bytes(b"")
    else:
        raise ValueError(row)
    while recv_ack() != b"E":  # the consumer's last acks, then its end
        pass
    return {"t_start": t_start, "count": seq}


def consume(st, row, size, cell, time_reads=False):
    link = st.link
    _, crc = st.tail(size)
    B = batch_of(size)
    crc32, read_s = zlib.crc32, [0.0]
    if time_reads:  # the read (crc32 over the message) timed alone, in every row alike

        def crc32(data, _crc32=zlib.crc32, _pc=time.perf_counter):
            t = _pc()
            out = _crc32(data)
            read_s[0] += _pc() - t
            return out

    seq = 0
    if row.startswith("iceoryx2"):
        sub, listener, _, _, T, tick = st.iox_ports(size, "consumer", WINDOW_BATCHES * B)
        receive, wait = sub.receive, listener.timed_wait
        st.ready(False)
        done = False
        while not done:
            wait(tick)
            while True:
                smp = receive()
                if smp is None:
                    break
                if smp.header.number_of_elements == 0:
                    smp.delete()
                    done = True
                    break
                mv = memoryview(T.from_address(smp.payload_ptr)).cast("B")
                if crc32(mv[8:]) != crc or int.from_bytes(mv[:8], "little") != seq:
                    bad_message(seq, int.from_bytes(mv[:8], "little"))
                mv.release()
                smp.delete()
                seq += 1
        return {"t_end": time.perf_counter(), "count": seq, "read_s": read_s[0]}

    recv_bytes, ack = link.recv_bytes, link.send_bytes
    st.ready(False)
    if row == "shmalloc channel":
        rx = st.heap.open_channel(int.from_bytes(recv_bytes(), "little"))
        recv, release = rx.recv, rx.release
        while True:
            mv = recv()
            if not mv:
                break
            if crc32(mv[8:]) != crc or int.from_bytes(mv[:8], "little") != seq:
                bad_message(seq, int.from_bytes(mv[:8], "little"))
            mv.release()
            release()
            seq += 1
        t_end = time.perf_counter()
        release()
        rx.close()
        ack(b"E")
        return {"t_end": t_end, "count": seq, "read_s": read_s[0]}
    if row.startswith("shmalloc"):
        view, free = st.heap.view, st.heap.free
        batched = row == "shmalloc batched"
        while True:
            data = recv_bytes()
            if not data:
                break
            if batched:
                hs = array("Q")
                hs.frombytes(data)
            else:
                hs = (int.from_bytes(data, "little"),)
            for h in hs:
                mv = view(h, size)
                if crc32(mv[8:]) != crc or int.from_bytes(mv[:8], "little") != seq:
                    bad_message(seq, int.from_bytes(mv[:8], "little"))
                mv.release()
                free(h)
                seq += 1
                if seq % B == 0:
                    ack(b"a")
    elif row == "pickle":
        recv = link.recv
        while True:
            msg = recv()
            if msg is None:
                break
            mv = memoryview(msg)
            if crc32(mv[8:]) != crc or int.from_bytes(mv[:8], "little") != seq:
                bad_message(seq, int.from_bytes(mv[:8], "little"))
            seq += 1
            if seq % B == 0:
                ack(b"a")
    elif row == "SharedMemory":
        from multiprocessing.shared_memory import SharedMemory

        prefix = f"{st.iox_cfg[2]}m{cell}_"
        while True:
            data = recv_bytes()
            if not data:
                break
            shm = SharedMemory(name=f"{prefix}{int.from_bytes(data, 'little')}")
            mv = shm.buf[:size]
            if crc32(mv[8:]) != crc or int.from_bytes(mv[:8], "little") != seq:
                bad_message(seq, int.from_bytes(mv[:8], "little"))
            mv.release()
            shm.close()
            shm.unlink()
            seq += 1
            if seq % B == 0:
                ack(b"a")
    else:
        raise ValueError(row)
    t_end = time.perf_counter()
    ack(b"E")
    return {"t_end": t_end, "count": seq, "read_s": read_s[0]}


HANDLERS = {"produce": produce, "consume": consume, "ping": lambda st: os.getpid()}


def worker_main(endpoint, ctl, link, iox_cfg):
    child_init()
    serve(ctl, HANDLERS, setup=lambda: State(endpoint, ctl, link, iox_cfg))


# ---------------------------------------------------------------------------------------------
# Ray: two actors in Ray's own worker processes


def ray_actors(ray):
    @ray.remote(num_cpus=0)
    class Consumer:
        def consume(self, refs, size, seq0, crc):
            import zlib as z

            arrays = ray.get(refs)
            seq = seq0
            for a in arrays:
                if z.crc32(a[8:]) != crc or int.from_bytes(a[:8].tobytes(), "little") != seq:
                    raise AssertionError(f"ray: message {seq}: wrong content")
                seq += 1
            del arrays
            return len(refs)

    @ray.remote(num_cpus=0)
    class Producer:
        def run(self, consumer, size, seconds, batch, window_batches):
            import time as tm
            import zlib as z

            import numpy as np

            tail = tail_of(size)
            crc = z.crc32(tail)
            seq = got = 0
            inflight = []
            t_start = tm.perf_counter()
            t_end = t_start + seconds
            while True:
                if len(inflight) >= window_batches:
                    got += ray.get(inflight.pop(0))
                refs = []
                for _ in range(batch):
                    refs.append(ray.put(np.frombuffer(seq.to_bytes(8, "little") + tail, dtype=np.uint8)))
                    seq += 1
                inflight.append(consumer.consume.remote(refs, size, seq - batch, crc))
                del refs
                if tm.perf_counter() >= t_end:
                    break
            got += sum(ray.get(inflight))
            return {"t_start": t_start, "t_end": tm.perf_counter(), "count": seq, "consumed": got}

    consumer = Consumer.remote()
    producer = Producer.remote()
    return producer, consumer


# ---------------------------------------------------------------------------------------------
# the parent


def answer(ctl, timeout=600):
    if not ctl.poll(timeout):
        raise WorkerError(f"no answer from a worker within {timeout} s")
    status, value = ctl.recv()
    if status not in ("ok", "ready"):
        raise WorkerError(value)
    return value


def run_cell(ctls, row, size, seconds, cell, time_reads=False):
    """One cell: (messages a second, the consumer's seconds a message in its reads)."""
    prod, cons = ctls
    call(cons, "consume", row=row, size=size, cell=cell, time_reads=time_reads)
    answer(cons)  # ready: its receiving end exists
    call(prod, "produce", row=row, size=size, seconds=seconds, cell=cell)
    answer(prod)  # ready
    prod.send(time.perf_counter())  # start now
    from multiprocessing.connection import wait

    res = {}
    while len(res) < 2:
        for c in wait([c for c in (prod, cons) if c not in res], 900):
            res[c] = answer(c, 0)
    p, c = res[prod], res[cons]
    if p["count"] != c["count"]:
        raise WorkerError(f"{row} {size}: {p['count']} messages sent, {c['count']} received")
    return c["count"] / (c["t_end"] - p["t_start"]), c["read_s"] / max(c["count"], 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--sizes",
        default=DEFAULT_SIZES,
        help=f"comma-separated, K/M suffixes, >= 8 (default {DEFAULT_SIZES})",
    )
    ap.add_argument("--rows", default=",".join(ALL_ROWS), help="a subset of: " + ", ".join(ALL_ROWS))
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 3; --quick 1)")
    ap.add_argument("--seconds", type=float, default=None, help="one cell's run (default 1; --quick 0.2)")
    ap.add_argument("--max-heap", default="2G")
    ap.add_argument(
        "--time-reads",
        action="store_true",
        help="also time each consumer's read (crc32 over the message) alone and print it per row: "
        "what is left of a message is the row's own work (the timer adds about 0.1 us a message)",
    )
    ap.add_argument(
        "--quick", action="store_true", help="a smoke run of a few seconds (plus Ray's start if installed)"
    )
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    secs = args.seconds or (0.2 if args.quick else 1.0)
    sizes = parse_sizes(args.sizes)
    if min(sizes) < 8:
        ap.error("sizes must be at least 8 bytes (the sequence number)")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if r not in ALL_ROWS:
            ap.error(f"unknown row {r!r}")

    print(header("bench_handoff: producer -> consumer hand-off"), flush=True)
    print()
    if any(r.startswith("iceoryx2") for r in rows) and not have("iceoryx2"):
        skipped("iceoryx2")
        rows = [r for r in rows if not r.startswith("iceoryx2")]
    if "ray" in rows and not (have("ray") and have("numpy")):
        skipped("ray")
        rows.remove("ray")
    print(
        f"{secs:g} s per cell, medians of {reps}; B (handles per batch, ack period) = "
        + ", ".join(f"{fmt_size(n)}: {batch_of(n)}" for n in sizes)
        + (
            "; the iceoryx2 consumer waits on an event Listener" if any("iceoryx2" in r for r in rows) else ""
        ),
        flush=True,
    )
    print()

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    rates, reads = {}, {}
    with Session(args.max_heap) as session:
        prefix, root = session.iceoryx2_config()
        iox_cfg = (prefix, root, session.prefix)
        a, b = ctx.Pipe()
        ctls = []
        for name, link in (("producer", a), ("consumer", b)):
            parent_end, child_end = ctx.Pipe()
            ctls.append(parent_end)
            session.spawn(worker_main, (session.endpoint, child_end, link, iox_cfg), name=f"bench-{name}")
            child_end.close()
        a.close()
        b.close()
        for c in ctls:
            call(c, "ping")
        for c in ctls:
            answer(c, 120)
        ray = producer = consumer = None
        if "ray" in rows:
            t = time.perf_counter()
            ray = session.ray_init()
            producer, consumer = ray_actors(ray)
            ray.get(producer.run.remote(consumer, 64, 0.05, 1, WINDOW_BATCHES))  # both actors up
            print(f"ray started in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)

        cell = 0
        for rep in range(reps):
            order = rows[rep % len(rows) :] + rows[: rep % len(rows)]
            for size in sizes:
                for row in order:
                    cell += 1
                    if row == "ray":
                        r = ray.get(producer.run.remote(consumer, size, secs, batch_of(size), WINDOW_BATCHES))
                        if r["consumed"] != r["count"]:
                            raise WorkerError(f"ray: {r['count']} messages put, {r['consumed']} read")
                        rate = r["count"] / (r["t_end"] - r["t_start"])
                    else:
                        try:
                            rate, read = run_cell(ctls, row, size, secs, cell, args.time_reads)
                            reads.setdefault((size, row), []).append(read)
                        except WorkerError as e:
                            raise WorkerError(f"in the cell {row!r}, {fmt_size(size)}:\n{e}") from None
                    rates.setdefault((size, row), []).append(rate)
            print(f"repetition {rep + 1}/{reps} done", file=sys.stderr, flush=True)
        for c in ctls:
            call(c, "quit")
        for c in ctls:
            answer(c, 60)
        for p in session.procs:
            p.join(10)

    med = {k: median(v) for k, v in rates.items()}
    print(f"messages per second, median of {reps}:")
    print()
    print(
        md_table(["size"] + rows, [[fmt_size(n)] + [fmt_num(med.get((n, r))) for r in rows] for n in sizes])
    )
    print()
    pairs = [
        ("shmalloc channel", "pickle"),
        ("shmalloc batched", "pickle"),
        ("shmalloc 1/msg", "pickle"),
        ("shmalloc channel", "iceoryx2 batched"),
        ("shmalloc batched", "iceoryx2 batched"),
        ("shmalloc 1/msg", "iceoryx2 1/msg"),
    ]
    pairs = [(a, b) for a, b in pairs if a in rows and b in rows]
    if pairs:
        out, verdicts = [], {p: 0 for p in pairs}
        for n in sizes:
            line = [fmt_size(n)]
            for a, b in pairs:
                x = ratio(med.get((n, a)), med.get((n, b)))
                line.append(fmt_ratio(x))
                if x is not None:
                    need = (
                        1.0 if b == "pickle" else (1 / 1.5 if n <= 4096 else 1.0 if n >= 256 << 10 else None)
                    )
                    verdicts[a, b] += need is None or (x > need if b == "pickle" else x >= need)
            out.append(line)
        print("ratios of medians (above 1: shmalloc moves more messages per second):")
        print()
        print(md_table(["size"] + [f"{a} / {b}" for a, b in pairs], out))
        print()
        for (a, b), ok in verdicts.items():
            what = (
                "beat pickle at every size"
                if b == "pickle"
                else "within 1.5x of iceoryx2 up to 4 KiB, at least level (>= 1.0x) from 256 KiB"
            )
            print(f"target {a} vs {b}: {what}: met at {ok} of {len(sizes)} sizes")
        print()
    if args.time_reads:
        print("the consumer's read (crc32 over the message) alone, µs a message, median of", reps)
        print("-- and what the rest of the message costs, 1e6 / rate - read:")
        print()
        timed = [r for r in rows if r != "ray"]
        line = []
        for n in sizes:
            cells = []
            for r in timed:
                read, rate = median(reads.get((n, r), [])), med.get((n, r))
                cells.append(
                    "-" if read is None or not rate else f"{read * 1e6:.2f} + {1e6 / rate - read * 1e6:.2f}"
                )
            line.append([fmt_size(n)] + cells)
        print(md_table(["size"] + timed, line))
        print()
    print("every run (msg/s):")
    print()
    print(
        md_table(
            ["size", "row", "runs"],
            [[fmt_size(n), r, ", ".join(fmt_num(x) for x in rates[n, r])] for n in sizes for r in rows],
            right=[False, False, True],
        )
    )


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
