"""ProcessCache: a P's local cache, the allocation fast path (Go's mcache).
See shm/__init__.py for an overview.

One per worker process (a P).  For every size class it caches at most one span and keeps a
plain Python list of that span's free objects (their allocation-map bytes are LISTED, already
counted as mallocs).  The fast path takes no lock of any kind:

    alloc(size)   class = SIZE_TO_CLASS[(size+7)>>3]; handle = list.pop(); map byte := TAG(k)
    free(h)       if map byte == TAG(k): map byte := FREE        (our own cached span)

Both first test the stop byte of the P's slot, which the daemon sets to park the world (Go's
preemption request).  Everything else -- an empty list (refill), a large object, a free of
someone else's object, a bad handle, a set stop byte -- is the slow path: under the P's
`threading.Lock`, then an Op under central/heap locks.

Who may run the fast path.  Like a Go P, which one M runs at a time, the fast path belongs to
the thread that made the cache (the owner).  It says it is inside with a `busy` flag, set before
it reads the stop byte and cleared on the way out; the control thread (client/) parks the P by
taking the lock and waiting for `busy` to clear, so no alloc or free is ever half done when the
P says it is parked.  The first call from any other thread switches the cache to shared mode
for good: every call then takes the locked path (thread-safe; a 64 B pair then costs about
3-3.7 us instead of 0.8-0.9 us, bench/bench_fastpath.py).  Closing the cache, fork() and shared mode all work the same way: the
stop byte the fast path reads is swapped for a local non-zero byte, which sends every call to
the slow path.
"""

import _thread
import os
import threading
import time
import weakref

from . import layout as L
from .central import tag
from .errors import ArenaClosed, BadHandle, ForkedHeap, OutOfMemory
from .locks import ofd_wait_unlocked
from .sizeclasses import CLASS_TO_SIZE, MAX_SMALL_SIZE, SIZE_TO_CLASS

SL = L.SLOT
_STOP_PARK, _STOP_RESYNC = 1, 2
_CLOSED = bytearray(b"\x03")  # stop byte of a closed or forked cache: every call takes the slow path
_SHARED = bytearray(b"\x04")  # stop byte of a cache in shared mode: every call takes the locked path


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
        self.owner = _thread.get_ident()
        self.shared = False
        self._tag = tag(k)
        self._lists = [[] for _ in range(L.NCLASS)]
        self._lock = threading.Lock()
        self._busy = [0]
        self._amap = arena.view(lay.amap_off, lay.amap_off + lay.amap_bytes)
        self._hb = lay.heap_off
        # One test instead of three for "0 <= h - heap_off < handle_range and 8-aligned".
        self._mask = ~(lay.handle_range - 1) | 7
        self._sw = lay.slot_word(k)
        stop_off = (self._sw + SL["stop"]) * 8
        self._shm_stop = arena.view(stop_off, stop_off + 1)
        self._flush_gen = arena.q[self._sw + SL["flush_gen"]]
        self.parks = 0
        _CACHES.add(self)
        self._bind_fast_path()

    # --- the fast path ------------------------------------------------------------------
    def _bind_fast_path(self):
        """Make `self.alloc` and `self.free`: closures over everything they touch (a cell read
        is several times cheaper than an attribute lookup; the pair's budget is 1 us)."""
        lists, amap, hb, mask, tag_k = self._lists, self._amap, self._hb, self._mask, self._tag
        busy, owner, get_ident = self._busy, self.owner, _thread.get_ident
        stop = self._shm_stop  # a cell: _set_stop() swaps it (closed, forked, shared)
        slow_alloc, slow_free = self._slow_alloc, self._slow_free
        s2c, c2s, B, MAXS = SIZE_TO_CLASS, CLASS_TO_SIZE, Block, MAX_SMALL_SIZE

        def alloc(size):
            """A Block of at least `size` bytes (not zeroed).  OutOfMemory when full."""
            if 0 < size <= MAXS and get_ident() == owner:
                c = s2c[(size + 7) >> 3]
                lst = lists[c]
                busy[0] = 1
                try:
                    if lst and not stop[0]:
                        h = lst.pop()
                        amap[(h - hb) >> 3] = tag_k
                        return B((h, size, c2s[c], self))
                finally:
                    busy[0] = 0
            return slow_alloc(size)

        def free(block):
            """Free a Block or an int handle allocated by any process.  BadHandle or
            DoubleFree for anything that is not a live block; nothing changes then."""
            cls = block.__class__
            h = block[0] if cls is B else block if cls is int else _handle(block)
            if get_ident() == owner:
                busy[0] = 1
                try:
                    if not stop[0]:
                        d = h - hb
                        if not d & mask and amap[d >> 3] == tag_k:
                            amap[d >> 3] = 0
                            return
                finally:
                    busy[0] = 0
            slow_free(h)

        def set_stop(view):
            nonlocal stop
            stop = view

        self.alloc, self.free, self._set_stop = alloc, free, set_stop

    # --- the slow paths (under the P lock) ----------------------------------------------
    def _enter_slow(self):
        """Caller holds the P lock.  Switch to shared mode on a foreign thread's first call;
        park or resync if the stop byte asks."""
        if not self.shared and _thread.get_ident() != self.owner:
            self._check_usable()
            self.shared = True
            self._set_stop(_SHARED)
            self._wait_not_busy()
        if self.closed_or_forked() or self._shm_stop[0]:
            self._sync()
        self.arena.q[self._sw + SL["active_ns"]] = time.monotonic_ns()

    def _wait_not_busy(self):
        """Caller holds the P lock: wait for the owner thread to leave the fast path."""
        busy = self._busy
        while busy[0]:
            time.sleep(0)

    def closed_or_forked(self):
        return self._closed or os.getpid() != self.pid

    def _slow_alloc(self, size):
        if size.__class__ is not int:
            size = size.__index__()
        if size < 0:
            raise ValueError(f"alloc size must be >= 0, got {size}")
        with self._lock:
            self._enter_slow()
            if size > MAX_SMALL_SIZE:
                if size > self.arena.lay.heap_max:
                    raise OutOfMemory(f"alloc of {size} bytes exceeds the whole heap ({self.arena.lay.heap_max} bytes)")
                h, cap = self.arena.run(self.slot, lambda op: self.arena.alloc_large(op, size))
                return Block((h, size, cap, self))
            c = SIZE_TO_CLASS[(size + 7) >> 3] if size else 1  # malloc(0): a distinct, freeable block
            lst = self._lists[c]
            h = lst.pop() if lst else self._refill(c)
            self._amap[(h - self._hb) >> 3] = self._tag
            return Block((h, size, CLASS_TO_SIZE[c], self))

    def _slow_free(self, h):
        with self._lock:
            self._enter_slow()
            d = h - self._hb if h.__class__ is int else -1
            if d >= 0 and not d & self._mask and self._amap[d >> 3] == self._tag:
                self._amap[d >> 3] = 0
            else:
                self.arena.free(h, self.slot)

    def view(self, handle, size=None):
        """Zero-copy memoryview of the live block at `handle` (allocated by any process):
        its whole capacity, or its first `size` bytes."""
        if self.closed_or_forked():
            self._check_usable()
        cap = self.arena.block_capacity(handle)
        if size is None:
            size = cap
        elif not 0 <= size <= cap:
            raise BadHandle(f"view of {size} bytes of a block of {cap}")
        h = int(handle)
        return self.arena.mv[h:h + size]

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
        self._lists[c][:] = lst
        return self._lists[c].pop()

    def _sync(self):
        """The stop byte is set: park if the daemon asks, drop the local lists if our cache was
        flushed.  Caller holds the P lock and the owner is not in the fast path."""
        self._check_usable()
        q, sw = self.arena.q, self._sw
        if q[sw + SL["stop"]] == _STOP_PARK:
            self._wait_not_busy()
            self._park(q[sw + SL["stop_epoch"]])
        if q[sw + SL["flush_gen"]] != self._flush_gen:
            self._wait_not_busy()
            self._drop_lists()
        if q[sw + SL["stop"]] == _STOP_RESYNC:
            q[sw + SL["stop"]] = 0

    def _park(self, epoch):
        """Say we are parked for `epoch`, then sleep until the daemon lifts the stop: it holds
        the resume lock while the world is stopped, and we wait for that lock in the kernel.
        Nothing is half done: the caller holds the P lock, the fast path is not running, and
        every shared byte is already written."""
        q, sw = self.arena.q, self._sw
        q[sw + SL["parked_ns"]] = time.monotonic_ns()
        q[sw + SL["parked"]] = epoch
        self.parks += 1
        while q[sw + SL["stop"]] == _STOP_PARK and q[sw + SL["stop_epoch"]] == epoch:
            ofd_wait_unlocked(self.arena.fd, L.resume_lock_byte(epoch))
            if q[sw + SL["stop"]] == _STOP_PARK and q[sw + SL["stop_epoch"]] == epoch:
                # The lock is free but the stop stands: the daemon is gone (the kernel dropped
                # its lock), or it is between two steps of taking it.
                if not self._daemon_alive():
                    q[sw + SL["stop"]] = _STOP_RESYNC  # go on without it
                    break
                time.sleep(200e-6)

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
        """Called by the control thread: park for the pending request, if any.  Waits for the
        owner to leave the fast path first; the lock keeps every slow path out."""
        with self._lock:
            if not self.closed_or_forked() and self._shm_stop[0]:
                self._sync()

    def flush(self):
        """Give every cached span back to the central lists (Go: mcache.releaseAll) -- by the
        P itself."""
        with self._lock:
            self._check_usable()
            self._wait_not_busy()
            if self._shm_stop[0]:
                self._sync()
            self.arena.release_all(self.slot, actor=self.slot)
            self._drop_lists()

    def _check_usable(self):
        if os.getpid() != self.pid:
            raise ForkedHeap("this Heap belongs to the parent process (pid %d); call client.connect() "
                             "in the child to get a P of its own" % self.pid)
        if self._closed:
            raise ArenaClosed("this heap is closed")

    _closed = False

    def close(self):
        """Flush the cache and give the slot back.  The arena stays attached (Arena.close)."""
        with self._lock:
            if self._closed or os.getpid() != self.pid:
                self._closed = True
                self._set_stop(_CLOSED)
                return
            self._set_stop(_CLOSED)
            self._wait_not_busy()
            if self._shm_stop[0]:
                self._sync()  # a snapshot is waiting for this P: park for it first
            self._closed = True
            self.arena.release_all(self.slot, actor=self.slot)
            self._drop_lists()
            self.arena.release_slot(self.slot)

    def _after_fork_in_child(self):
        # Every call of the child now takes the slow path, which raises ForkedHeap.
        self._set_stop(_CLOSED)


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
