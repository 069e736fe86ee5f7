"""ProcessCache: a P's local cache, the allocation fast path (Go's mcache).
See shm/__init__.py for an overview.

One per worker process (a P).  For every size class it caches at most one span and keeps a
plain Python list of that span's free objects (their allocation-map bytes are LISTED, already
counted as mallocs).  The fast path takes no cross-process lock:

    alloc(size)   class = SIZE_TO_CLASS[(size+7)>>3]; handle = list.pop(); map byte := TAG(k)
    free(h)       if map byte == TAG(k): map byte := FREE        (our own cached span)

and both first test the stop byte of the P's slot, which the daemon sets to park the world
(Go's preemption request).  Everything else -- an empty list (refill), a large object, a free of
someone else's object, a bad handle -- is the slow path, an Op under central/heap locks.

A `threading.Lock` per P makes the cache safe for threads of one process and lets the control
thread (client/) park the P between two calls: no alloc or free is ever half done when the P
says it is parked.
"""

import os
import threading
import time
import weakref

from . import layout as L
from .central import tag
from .errors import ArenaClosed, BadHandle, ForkedHeap, OutOfMemory
from .sizeclasses import CLASS_TO_SIZE, MAX_SMALL_SIZE, SIZE_TO_CLASS

SL = L.SLOT
_new = tuple.__new__
_STOP_PARK, _STOP_RESYNC = 1, 2
_CLOSED = bytearray(b"\x03")  # stop byte of a closed or forked cache: every call takes the slow path


class Block(tuple):
    """An allocated block: (handle, size asked, capacity usable, heap).  A tuple, so that making
    one on the fast path costs one C call."""

    __slots__ = ()

    handle = property(lambda self: self[0], doc="int: the block's handle (byte offset in the arena)")
    size = property(lambda self: self[1], doc="bytes asked for")
    capacity = property(lambda self: self[2], doc="usable bytes (the size class, or whole pages)")

    @property
    def buf(self):
        """Zero-copy memoryview of the block's `size` bytes."""
        return self[3].view(self[0], self[1])

    def __repr__(self):
        return f"Block(handle={self[0]}, size={self[1]}, capacity={self[2]})"

    def __int__(self):
        return self[0]

    __index__ = __int__


class ProcessCache:
    """A P: one slot of the arena, its local cache, and the fast path."""

    def __init__(self, arena, slot=None):
        self.arena = arena
        self.slot = arena.claim_slot() if slot is None else slot
        lay = arena.lay
        k = self.slot
        self.pid = os.getpid()
        self._tag = tag(k)
        self._lists = [[] for _ in range(L.NCLASS)]
        self._lock = threading.Lock()
        self._amap = arena.view(lay.amap_off, lay.amap_off + lay.amap_bytes)
        self._hb = lay.heap_off
        # One test instead of three for "0 <= h - heap_off < handle_range and 8-aligned".
        self._mask = ~(lay.handle_range - 1) | 7
        self._sw = lay.slot_word(k)
        stop_off = (self._sw + SL["stop"]) * 8
        # The stop byte, in a one-element list the fast path reads through, so close() and
        # fork() can swap in a byte that sends every call to the slow path.
        self._stop_cell = [arena.view(stop_off, stop_off + 1)]
        self._flush_gen = arena.q[self._sw + SL["flush_gen"]]
        self.park_timeout = 10.0   # seconds a parked P waits for the daemon before resuming alone
        self.parks = 0
        _CACHES.add(self)
        self._bind_fast_path()

    # --- the fast path ------------------------------------------------------------------
    def _bind_fast_path(self):
        """Make `self.alloc` and `self.free`: closures over everything they touch, because a
        closure's cell read is several times cheaper than an attribute lookup and the whole
        pair has a budget of 1 us (docs/PERFORMANCE.md)."""
        lists, amap, hb, mask, tag_k = self._lists, self._amap, self._hb, self._mask, self._tag
        lock = self._lock
        acquire, release = lock.acquire, lock.release
        stop = self._stop_cell
        refill, sync, alloc_other, slow_free = self._refill, self._sync, self._alloc_other, self.arena.free
        k = self.slot
        s2c, c2s, new, B, MAXS = SIZE_TO_CLASS, CLASS_TO_SIZE, _new, Block, MAX_SMALL_SIZE

        def alloc(size):
            """A Block of at least `size` bytes (not zeroed).  OutOfMemory when full."""
            if 0 < size <= MAXS:
                c = s2c[(size + 7) >> 3]
            else:
                return alloc_other(size)
            acquire()
            try:
                if stop[0][0]:
                    sync()
                lst = lists[c]
                h = lst.pop() if lst else refill(c)
                amap[(h - hb) >> 3] = tag_k
            finally:
                release()
            return new(B, (h, size, c2s[c], self))

        def free(block):
            """Free a Block or an int handle allocated by any process.  BadHandle or
            DoubleFree for anything that is not a live block; nothing changes then."""
            h = block[0] if block.__class__ is B else _handle(block)
            acquire()
            try:
                if stop[0][0]:
                    sync()
                d = h - hb
                if not d & mask and amap[d >> 3] == tag_k:
                    amap[d >> 3] = 0
                else:
                    slow_free(h, k)
            finally:
                release()

        self.alloc, self.free = alloc, free

    def view(self, handle, size=None):
        """Zero-copy memoryview of the live block at `handle` (allocated by any process):
        its whole capacity, or its first `size` bytes."""
        if self._stop_cell[0] is _CLOSED:
            self._check_usable()
        cap = self.arena.block_capacity(handle)
        if size is None:
            size = cap
        elif not 0 <= size <= cap:
            raise BadHandle(f"view of {size} bytes of a block of {cap}")
        h = int(handle)
        return self.arena.mv[h:h + size]

    # --- the slow paths -------------------------------------------------------------------
    def _alloc_other(self, size):
        if size.__class__ is not int:
            size = size.__index__()
            if 0 < size <= MAX_SMALL_SIZE:
                return self.alloc(size)
        if size == 0:  # a distinct, freeable block, as malloc(0) gives
            b = self.alloc(1)
            return _new(Block, (b[0], 0, b[2], self))
        if size < 0:
            raise ValueError(f"alloc size must be >= 0, got {size}")
        if size > self.arena.lay.heap_max:
            raise OutOfMemory(f"alloc of {size} bytes exceeds the whole heap ({self.arena.lay.heap_max} bytes)")
        with self._lock:
            if self._stop_cell[0][0]:
                self._sync()
            h, cap = self.arena.run(self.slot, lambda op: self.arena.alloc_large(op, size))
        return _new(Block, (h, size, cap, self))

    def _refill(self, c):
        """The list of class c is empty (Go: mcache.refill).  Collect what was freed in our
        span of class c; if nothing was, uncache it and cache another span.  Caller holds the
        P lock.  Returns one handle; the rest go to the list."""
        arena, k = self.arena, self.slot
        central = arena.central
        cached_w = self._sw + L.SLOT_CACHED_AT + c

        def refill(op):
            op.acquire(L.LOCK_CENTRAL(c))
            r = arena.q[cached_w] - 1
            if r >= 0:
                got = central.collect(op, c, r, k)
                if got:
                    return got
                central.uncache_span(op, c, r, k)
            return central.cache_span(op, c, k)[1]

        lst = arena.run(k, refill)
        self._lists[c] = lst
        return lst.pop()

    def _sync(self):
        """The stop byte is set: park if the daemon asks, drop the local lists if our cache was
        flushed.  Caller holds the P lock."""
        self._check_usable()
        q, sw = self.arena.q, self._sw
        if q[sw + SL["stop"]] == _STOP_PARK:
            self._park(q[sw + SL["stop_epoch"]])
        if q[sw + SL["flush_gen"]] != self._flush_gen:
            self._drop_lists()
        if q[sw + SL["stop"]] == _STOP_RESYNC:
            q[sw + SL["stop"]] = 0

    def _park(self, epoch):
        """Say we are parked for `epoch`, then wait until the daemon lifts the stop.  Nothing
        is half done: the caller holds the P lock and every shared byte is already written."""
        q, sw = self.arena.q, self._sw
        q[sw + SL["parked"]] = epoch
        self.parks += 1
        deadline = time.monotonic() + self.park_timeout
        pause = 20e-6
        while q[sw + SL["stop"]] == _STOP_PARK and q[sw + SL["stop_epoch"]] == epoch:
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
            if time.monotonic() > deadline and not self._daemon_alive():
                q[sw + SL["stop"]] = 0  # the daemon died mid-pause: go on without it
                break

    def _daemon_alive(self):
        pid = self.arena.q[L.HDR["daemon_pid"]]
        if not pid:
            return False
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def _drop_lists(self):
        for lst in self._lists:
            lst.clear()
        self._flush_gen = self.arena.q[self._sw + SL["flush_gen"]]

    def park_now(self):
        """Called by the control thread: park for the pending request, if any (waits for the
        calling thread of alloc/free to leave the allocator first)."""
        with self._lock:
            if self._stop_cell[0] is not _CLOSED and self._stop_cell[0][0]:
                self._sync()

    def flush(self):
        """Give every cached span back to the central lists (Go: mcache.releaseAll) -- by the
        P itself."""
        with self._lock:
            self._check_usable()
            self.arena.release_all(self.slot, actor=self.slot)
            self._drop_lists()

    def _check_usable(self):
        if os.getpid() != self.pid:
            raise ForkedHeap("this Heap belongs to the parent process (pid %d); call client.connect() "
                             "in the child to get a P of its own" % self.pid)
        if self._stop_cell[0] is _CLOSED:
            raise ArenaClosed("this heap is closed")

    def close(self):
        """Flush the cache and give the slot back.  The arena stays attached (Arena.close)."""
        with self._lock:
            if self._stop_cell[0] is _CLOSED or os.getpid() != self.pid:
                self._stop_cell[0] = _CLOSED
                return
            self.arena.release_all(self.slot, actor=self.slot)
            self._drop_lists()
            self._stop_cell[0] = _CLOSED
            self.arena.release_slot(self.slot)

    def _after_fork_in_child(self):
        # Every call of the child now takes the slow path, which raises ForkedHeap.
        self._stop_cell[0] = _CLOSED


_CACHES = weakref.WeakSet()


def _after_fork_in_child():
    for cache in list(_CACHES):
        cache._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _handle(block):
    if block.__class__ is int:
        return block
    try:
        return block.__index__()
    except AttributeError:
        raise BadHandle(f"free() takes a Block or an int handle, got {type(block).__name__}") from None
