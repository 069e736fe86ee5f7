"""shmalloc in a process pool: this process's default Heap, Blocks that pickle as references,
`Heap.put`, and out-of-band pickling (PEP 574) through the heap.

    client.heap()                 this process's default Heap: connected on first use to
                                  $SHMALLOC_ENDPOINT (or the default endpoint), closed at exit,
                                  made anew in a forked or spawned child on its first use there
    pickle.dumps(block)           a reference (arena id, handle, size): some 60 bytes, any size
    pickle.loads(data)            a Block for the same memory, zero copy, in any process that
                                  reaches the same daemon; ForeignReference if it names another
                                  arena (another daemon, or one stopped since)
    client.oob_dumps(obj)         pickle protocol 5; every buffer of at least `threshold` bytes is
                                  copied into a block once and travels as a reference
    client.oob_loads(payload)     the object, its large buffers viewing the heap (zero copy)
    client.oob_free(payload)      frees the payload's blocks: once, by whoever is done last

Who frees what (explicit freeing stays the rule: there is no collector):
  - a Block or heap array: whoever is done with it last frees it, once, from any process
    (`heap.free(block)`, `heap.free(array)`); a pickled reference does not own anything, so
    pickling, sending and loading never free and never copy.
  - an oob payload: `oob_free(payload)`, once, after every object loaded from it is dropped (the
    objects view the blocks).  A payload never loaded is freed the same way.

How a Block pickles without shm importing client: this module registers `_reduce_block` for
Block with `copyreg` when client is imported (every pickler, multiprocessing's ForkingPickler
included, consults copyreg's dispatch table before __reduce_ex__).  The reference names
`client.pool._load_block`, so unpickling imports client in a process that had not.
"""

import atexit
import copyreg
import os
import pickle
import threading
import weakref
from typing import TYPE_CHECKING, Any

from shm import Block
from shm.errors import ForeignReference

if TYPE_CHECKING:
    from . import Heap

__all__ = ["heap", "close_heap", "heap_for", "put", "oob_dumps", "oob_loads", "oob_free", "OOB_THRESHOLD"]

OOB_THRESHOLD = 64 << 10  # bytes: a buffer at least this large goes into the heap, out of band

_lock = threading.Lock()
_default: "Heap | None" = None
_default_pid = 0
# Every Heap this process made (client.Heap adds itself): a reference is loaded through one that
# is attached to the reference's arena before a default heap is connected for it.
_heaps: "weakref.WeakSet[Heap]" = weakref.WeakSet()


def _usable(h: "Heap | None") -> bool:
    return h is not None and h.pid == os.getpid() and not h._closed and not h.arena_closed()


def heap(endpoint: str | None = None) -> "Heap":
    """This process's default Heap: connected on first use (to `endpoint`, else
    $SHMALLOC_ENDPOINT, else the default endpoint), closed at exit.  A forked child never reuses
    its parent's: its first call connects a P of its own.  Use it as a Pool's initializer
    (`Pool(initializer=client.heap)`) to connect each worker before its first task."""
    global _default, _default_pid
    h = _default
    if not _usable(h):
        with _lock:
            h = _default
            if not _usable(h):
                from . import connect

                if h is not None and _default_pid == os.getpid():
                    h.close()  # its arena was closed for good: a P of the daemon serving now

                h = connect(endpoint)
                _default, _default_pid = h, os.getpid()
    assert h is not None
    if endpoint is not None and endpoint != h.endpoint:
        raise ValueError(
            f"this process's default heap is connected to {h.endpoint}, not {endpoint}: "
            "call client.close_heap() first, or client.connect(endpoint) for a second Heap"
        )
    return h


def close_heap() -> None:
    """Close this process's default Heap, if it made one (the next heap() connects anew).
    Registered with atexit; a forked child's exit never closes its parent's."""
    global _default
    with _lock:
        h, _default = _default, None
        if h is not None and _default_pid == os.getpid():
            h.close()


atexit.register(close_heap)


def _after_fork_in_child() -> None:
    global _lock, _default
    _lock = threading.Lock()  # another thread may have held it at the fork
    _default = None  # the parent's; ForkedHeap if used.  Not closed here: it is the parent's


os.register_at_fork(after_in_child=_after_fork_in_child)


def heap_for(arena_id: int) -> "Heap":
    """A Heap of this process attached to the arena `arena_id`: the default heap, else any open
    Heap of this process on that arena, else the default heap connected now.  ForeignReference
    when the daemon this process reaches serves another arena."""
    h = _default
    if _usable(h) and h.arena.arena_id == arena_id:  # type: ignore[union-attr]
        return h  # type: ignore[return-value]
    for other in list(_heaps):
        if _usable(other) and other.arena.arena_id == arena_id:
            return other
    h = heap()
    if h.arena.arena_id != arena_id:
        raise ForeignReference(
            f"this reference names arena {arena_id:#018x}, but the daemon at {h.endpoint} serves "
            f"arena {h.arena.arena_id:#018x}: the block was allocated under another daemon, or "
            "under one stopped since (its blocks are gone).  Load it in a process connected to "
            "the daemon that allocated it ($SHMALLOC_ENDPOINT, or client.heap(endpoint) first)."
        )
    return h


def _reduce_block(b: Block) -> tuple[Any, tuple[int, int, int]]:
    return _load_block, (b[3].arena.arena_id, b[0], b[1])


def _load_block(arena_id: int, handle: int, size: int) -> Block:
    h = heap_for(arena_id)
    return Block((handle, size, len(h.view(handle)), h))  # view: BadHandle if it is not live


copyreg.pickle(Block, _reduce_block)


def put(h: "Heap", data: Any) -> Block:
    """Copy any buffer-protocol object (bytes, bytearray, memoryview, an ndarray...) into a new
    block of `h`, in one call.  The caller owns the block (frees it, or passes it on)."""
    mv = memoryview(data)
    n = mv.nbytes
    blk = h.alloc(n)
    try:
        if n:
            dst = h.view(blk[0], n)
            dst[:] = mv.cast("B") if mv.c_contiguous else mv.tobytes()
    except BaseException:
        h.free(blk)
        raise
    return blk


def oob_dumps(obj: Any, threshold: int = OOB_THRESHOLD, into: "Heap | None" = None) -> bytes:
    """Pickle `obj` with protocol 5, its buffers of at least `threshold` bytes copied once into
    new blocks (of `into`, else this process's default heap) and carried by reference: a dict of
    arrays, a pandas frame or an Arrow table crosses a process boundary without its buffers
    being pickled.  The payload owns those blocks: oob_free(payload) frees them, once, when
    every object loaded from it is dropped."""
    h = into or heap()
    blocks: list[Block] = []

    def callback(pb: pickle.PickleBuffer) -> bool:
        raw = pb.raw()
        if raw.nbytes < threshold:
            return True  # in band
        blocks.append(put(h, raw))
        return False

    try:
        inner = pickle.dumps(obj, protocol=5, buffer_callback=callback)
        return pickle.dumps((inner, tuple(blocks)), protocol=5)
    except BaseException:
        for b in blocks:
            h.free(b)
        raise


def oob_loads(payload: bytes) -> Any:
    """The object `oob_dumps` pickled; its large buffers view the payload's blocks (zero copy,
    writable).  Frees nothing: see oob_free."""
    inner, blocks = pickle.loads(payload)
    return pickle.loads(inner, buffers=[b[3].view(b[0], b[1]) for b in blocks])


def oob_free(payload: bytes) -> int:
    """Free the payload's blocks (from any process that reaches the daemon); the objects loaded
    from it must not be used after.  Returns how many blocks were freed."""
    _, blocks = pickle.loads(payload)
    for b in blocks:
        b[3].free(b[0])
    return len(blocks)
