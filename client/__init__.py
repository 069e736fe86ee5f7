"""shmalloc's worker library: connect to the daemon, become a P, allocate zero-copy blocks.
See shm/__init__.py for the allocator's overview.

    import client
    heap = client.connect()           # endpoint: argument, $SHMALLOC_ENDPOINT, or the default
    blk = heap.alloc(1000)            # Block: .handle (int), .size, .capacity, .buf (memoryview)
    heap.free(blk)                    # or heap.free(blk.handle), from any process
    mv = heap.view(handle)            # zero-copy view of a block another process allocated
    ch = heap.channel()               # blocks to one other process, no system call a message:
    ch.send(blk)                      # ... rx = heap.open_channel(ch.handle) there, then
                                      # mv = rx.recv(); ...; rx.release() (the sender frees it)
    snap = heap.stats()               # consistent snapshot (every cache flushed first)
    client.stats(endpoint)            # the same from an observer that holds no P
    heap.close()                      # or: with client.connect() as heap: ...

In a process pool (client/pool.py, client/arrays.py):

    heap = client.heap()              # this process's default Heap (made anew after fork/spawn)
    with heap.alloc(n) as blk: ...    # a Block is a context manager: freed on exit
    blk = heap.put(b"bytes")          # any buffer-protocol object copied into a new block
    a = heap.ndarray((4, 4), "f8")    # a numpy array in a new block (the numpy extra)
    pickle.dumps(blk), pickle.dumps(a)  # references, not bytes: loaded zero-copy elsewhere
    payload = client.oob_dumps(obj)   # pickle protocol 5, large buffers in the heap;
    obj = client.oob_loads(payload)   # ... the receiver's views; client.oob_free(payload) once

Errors (one tree, shm/errors.py):

    ShmallocError
    ├── OutOfMemory, BadHandle (DoubleFree), BadSize, BadSizeType, LayoutMismatch,
    │   CorruptionError, ArenaClosed, ForkedHeap, NoFreeSlot, LockUnavailable,
    │   ForeignReference, ChannelClosed, ChannelBusy, ChannelUnsupported
    ├── StartupError
    └── ProtocolError ── DaemonUnavailable, NotRegistered, Forbidden, RemoteError

A Heap's fast path never waits on the daemon: allocation and free touch only shared memory.
A control thread owns the Heap's ZeroMQ socket (sockets are not thread-safe): it parks the P
when the daemon stops the world, and sends heartbeats.  After fork() the child's copy of a Heap
raises ForkedHeap: call client.connect() in the child.
"""

import itertools
import os
import threading
import warnings
from typing import Any, Literal

import zmq

from shm import Arena, Block, Channel, ProcessCache
from shm import layout as L
from shm.errors import (
    ArenaClosed,
    BadHandle,
    BadSize,
    BadSizeType,
    ChannelBusy,
    ChannelClosed,
    ChannelUnsupported,
    CorruptionError,
    DaemonUnavailable,
    DoubleFree,
    Forbidden,
    ForeignReference,
    ForkedHeap,
    LayoutMismatch,
    LockUnavailable,
    NoFreeSlot,
    NotRegistered,
    OutOfMemory,
    ProtocolError,
    RemoteError,
    ShmallocError,
)
from shm.world import close_for_good

from . import pool, protocol
from .curve import Curve, CurveKeyError, dealer
from .endpoint import default_endpoint, ipc_path
from .pool import OOB_THRESHOLD, close_heap, heap, oob_dumps, oob_free, oob_loads, put

__all__ = [
    "connect",
    "heap",
    "close_heap",
    "oob_dumps",
    "oob_loads",
    "oob_free",
    "OOB_THRESHOLD",
    "stats",
    "check",
    "ping",
    "Heap",
    "Block",
    "Channel",
    "ShmallocError",
    "OutOfMemory",
    "BadHandle",
    "BadSize",
    "BadSizeType",
    "DoubleFree",
    "LayoutMismatch",
    "CorruptionError",
    "ArenaClosed",
    "ForkedHeap",
    "NoFreeSlot",
    "LockUnavailable",
    "ForeignReference",
    "ChannelClosed",
    "ChannelBusy",
    "ChannelUnsupported",
    "ProtocolError",
    "DaemonUnavailable",
    "NotRegistered",
    "Forbidden",
    "RemoteError",
    "CurveKeyError",
]

_ids = itertools.count(1)


def _context():
    # Context.instance() is rebuilt after a fork (it checks the pid).
    return zmq.Context.instance()


def request(
    endpoint: str | None, op: str, timeout_ms: int = 5000, curve: Curve = None, **args: Any
) -> dict[str, Any]:
    """One request/reply on a fresh DEALER socket; DaemonUnavailable after `timeout_ms`.
    `curve`: (client secret certificate, server public certificate) for a CURVE tcp://
    endpoint; None takes them from $SHMALLOC_CURVE_CLIENT_KEY / $SHMALLOC_CURVE_SERVER_KEY
    (client/curve.py); False: none."""
    endpoint = endpoint or default_endpoint()
    path = ipc_path(endpoint)
    if path and not os.path.exists(path):
        raise DaemonUnavailable(
            f"no daemon at {endpoint}: {path} does not exist (is `shmalloc daemon` running?)"
        )
    sock, keyed = dealer(_context(), endpoint, curve)
    try:
        rid = next(_ids)
        sock.send(protocol.encode_request(op, rid, **args))
        while True:
            if not sock.poll(timeout_ms):
                raise DaemonUnavailable(_unanswered(op, endpoint, timeout_ms, keyed))
            reply = protocol.decode_reply(sock.recv(), op=op)
            if reply.get("id") == rid:
                return reply
    finally:
        sock.close(0)


def _unanswered(op, endpoint, timeout_ms, keyed):
    msg = f"no daemon answered {op!r} at {endpoint} within {timeout_ms} ms"
    if keyed:
        return (
            f"{msg} (is `shmalloc daemon` running there with CURVE? a daemon that does not know "
            "this client's public key, or whose key is not the server certificate given, never "
            "answers: copy the client's NAME.key into its --curve-clients directory and restart it)"
        )
    if endpoint.startswith("tcp://"):
        return (
            f"{msg} (is `shmalloc daemon` running there? if it serves CURVE, give the keys: "
            "--curve-client-key/--curve-server-key or $SHMALLOC_CURVE_CLIENT_KEY/$SHMALLOC_CURVE_SERVER_KEY)"
        )
    return f"{msg} (is `shmalloc daemon` running there?)"


def ping(endpoint: str | None = None, timeout_ms: int = 2000, curve: Curve = None) -> dict[str, Any]:
    return request(endpoint, "ping", timeout_ms, curve=curve)


def stats(
    endpoint: str | None = None,
    deadline_ms: int = 2000,
    slow: bool = False,
    timeout_ms: int | None = None,
    curve: Curve = None,
) -> dict[str, Any]:
    """A consistent snapshot from an observer that holds no P."""
    return request(
        endpoint, "stats", timeout_ms or deadline_ms + 5000, curve=curve, deadline_ms=deadline_ms, slow=slow
    )["snapshot"]


def check(endpoint: str | None = None, timeout_ms: int = 30000, curve: Curve = None) -> dict[str, Any]:
    """The daemon's full span walk: {"problems": [...], "snapshot": {...}}."""
    return request(endpoint, "check", timeout_ms, curve=curve)


class Heap(ProcessCache):
    """A P of the daemon's arena: the fast path of ProcessCache plus the control thread."""

    def __init__(self, endpoint: str | None = None, timeout_ms: int = 5000, curve: Curve = None) -> None:
        self.endpoint: str = endpoint or default_endpoint()
        self.curve: Curve = curve
        info = ping(self.endpoint, timeout_ms, curve)
        arena = Arena.attach(info["arena"])
        try:
            super().__init__(arena)
        except BaseException:
            arena.close()
            raise
        self._control = None
        try:
            self._control = _Control(self, timeout_ms)
            self._control.start()
            if not self._control.ready.wait(timeout_ms / 1000 + 1):
                raise DaemonUnavailable(
                    f"no daemon answered 'register' at {self.endpoint} within {timeout_ms} ms"
                )
            if self._control.error is not None:
                raise self._control.error
        except BaseException:
            if self._control is not None:
                self._control.stop()
                self._control = None
            self._close_local()
            raise
        pool._heaps.add(self)

    def put(self, data: Any) -> Block:
        """Copy any buffer-protocol object (bytes, bytearray, memoryview, an ndarray) into a
        new block, in one call.  The caller owns the block."""
        return put(self, data)

    def ndarray(self, shape: Any, dtype: Any = "float64", order: Literal["C", "F"] = "C") -> Any:
        """A numpy array (client.arrays.HeapArray) backed by a new block; needs numpy (the
        `numpy` extra).  It pickles as a reference; heap.free(array) frees its block."""
        from .arrays import new_array

        return new_array(self, shape, dtype, order)

    def channel(self, capacity: int = 256) -> Channel:
        """A new channel (shm/channel.py) whose sender is this process: `ch.send(block)`; the
        receiver opens it with `heap.open_channel(ch.handle)`.  Up to `capacity` messages in
        flight; a released message's block comes back to this process, which frees it."""
        return Channel.create(self, capacity)

    def open_channel(self, handle: int) -> Channel:
        """The receiving end of the channel at `handle` (a Channel's .handle): `mv =
        rx.recv()`, then `rx.release()` (or `rx.take()` to keep the block)."""
        return Channel.open(self, handle)

    def stats(self, deadline_ms: int = 2000, slow: bool = False) -> dict[str, Any]:
        """A consistent snapshot: the daemon parks every P -- this one included, through its
        control thread -- and flushes every cache before reading."""
        return stats(self.endpoint, deadline_ms, slow, curve=self.curve)

    def close(self) -> None:
        """Flush this P's cache into the arena, give the slot back, unmap.  Blocks stay."""
        if self._control is not None:
            self._control.stop()
            self._control = None
        self._close_local()

    def _close_local(self):
        ProcessCache.close(self)
        if os.getpid() == self.pid:
            self.arena.close()

    def __enter__(self) -> "Heap":
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"slot {self.slot}"
        return f"<client.Heap {self.endpoint} {state}>"

    def __del__(self):
        # Leak-loud, like an unclosed file: the slot stays taken until this process exits.
        if not self._closed and getattr(self, "pid", None) == os.getpid():
            warnings.warn(
                f"unclosed {self!r}: call close() or use `with client.connect()`",
                ResourceWarning,
                stacklevel=2,
            )


class _Control(threading.Thread):
    """Owns the Heap's DEALER socket.  Parks the P on STOP; heartbeats; unregisters at close."""

    def __init__(self, heap, timeout_ms=5000):
        super().__init__(name=f"shmalloc-control-{heap.slot}", daemon=True)
        self.heap = heap
        self.timeout_ms = timeout_ms
        self.heartbeat_ms = 1000
        # The slot's secret, written at claim: quoted in register, heartbeat and unregister.
        self.token = heap.arena.registry.token(heap.slot)
        self.arena_id = heap.arena.arena_id  # quoted in heartbeats: a daemon of another arena says so
        self.error = None
        self.ready = threading.Event()
        self._stop_evt = threading.Event()
        r, w = os.pipe()
        self._wake_r, self._wake_w = r, w

    def run(self):
        heap = self.heap
        try:
            sock, _ = dealer(_context(), heap.endpoint, heap.curve)
        except ShmallocError as e:
            self.error = e
            self.ready.set()
            return
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            if not self._register(sock):
                return
            while not self._stop_evt.is_set():
                events = dict(poller.poll(self.heartbeat_ms))
                if sock in events:
                    while True:
                        try:
                            frame = sock.recv(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._on_message(frame)
                elif not events:
                    sock.send(
                        protocol.encode_request(
                            "heartbeat",
                            next(_ids),
                            slot=heap.slot,
                            pid=os.getpid(),
                            token=self.token,
                            arena_id=self.arena_id,
                        )
                    )
            try:
                sock.send(
                    protocol.encode_request("unregister", next(_ids), slot=heap.slot, token=self.token),
                    zmq.NOBLOCK,
                )
            except zmq.ZMQError:
                pass
        finally:
            sock.close(0)

    def _register(self, sock):
        """Register on THIS socket, so the daemon sends this P's STOP messages here."""
        rid = next(_ids)
        sock.send(
            protocol.encode_request("register", rid, pid=os.getpid(), slot=self.heap.slot, token=self.token)
        )
        try:
            while True:
                if not sock.poll(self.timeout_ms):
                    raise DaemonUnavailable(
                        f"no daemon answered 'register' at {self.heap.endpoint} within {self.timeout_ms} ms"
                    )
                reply = protocol.decode_reply(sock.recv())
                if reply.get("id") == rid:
                    break
            if reply["slot"] != self.heap.slot:
                raise ProtocolError(f"daemon registered slot {reply['slot']}, this P holds {self.heap.slot}")
            self.heartbeat_ms = reply["heartbeat_ms"]
            return True
        except ShmallocError as e:
            self.error = e
            return False
        finally:
            self.ready.set()

    def _on_message(self, frame):
        try:
            msg = protocol.decode_reply(frame)
        except RemoteError as e:
            # The endpoint is served by a daemon of another arena: ours is gone for good.
            # Every P of it is told as a forced stop tells them (its next call raises).
            if e.code == ForeignReference.code and not self.heap.arena.closed:
                close_for_good(self.heap.arena, L.CLOSED_REPLACED)
            return
        except ShmallocError:
            return
        if msg.get("op") == "stop":
            try:
                self.heap.park_now()
            except (ForkedHeap, ArenaClosed):
                pass

    def stop(self):
        self._stop_evt.set()
        os.write(self._wake_w, b"x")  # the thread closes nothing: both ends are ours to close
        if threading.current_thread() is not self:
            self.join(5)
        os.close(self._wake_w)
        os.close(self._wake_r)


def connect(endpoint: str | None = None, timeout_ms: int = 5000, curve: Curve = None) -> Heap:
    """Become a P of the daemon at `endpoint` (argument, $SHMALLOC_ENDPOINT, or the default);
    `curve` as for `request` (a CURVE tcp:// endpoint)."""
    return Heap(endpoint, timeout_ms, curve)
