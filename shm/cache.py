"""ProcessCache: a P's local cache, the allocation fast path (Go's mcache).
See shm/__init__.py for an overview.

One per worker process (a P).  For every size class it caches at most one span and keeps a plain
Python list of that span's free objects (their allocation-map bytes are LISTED, already counted as
mallocs).  The fast path takes no lock of any kind:

    alloc(size)   class = SIZE_TO_CLASS[(size+7)>>3]; handle = list.pop(); map byte := TAG(k)
    free(h)       map byte == TAG(k) (our own span): relists[c] += 1; map byte := LISTED;
                  list.append(h)  -- the object is ours again at once (mimalloc's local free
                  list), counted as a malloc to come, as collect counts what it lists
    free(h)       map byte == ALLOC or TAG(j) (someone else's object): the handle goes into this
                  P's remote-free buffer (slot words rfree[]) and its map byte becomes RFREED (so
                  a second free fails at once), applied to the central lists in
                  batches of RFREE_CAP under one acquisition of each lock involved (tcmalloc's
                  transfer cache); a buffered free is a cache like the others, flushed first by
                  every snapshot
    large         over 32 KiB: a span owned by this P (large.py); freeing it keeps it in a per-P
                  cache by page count (Go's per-P page cache), so a pair of any size takes no lock

Every call says it is inside with the slot's `inside` byte, set before it reads the stop byte and
cleared on the way out (shm/world.py: the daemon stops a P that is not inside without its help).
Everything else -- an empty list (refill), a large size not cached, a full remote-free buffer, a
bad handle, a set stop byte -- is the slow path: under the P's `threading.Lock`, then an Op under
central/heap locks.

Who may run the fast path.  Like a Go P, which one M runs at a time, the fast path belongs to the
thread that made the cache (the owner).  The first call from any other thread switches the cache
to shared mode for good: every call then takes the locked path (thread-safe; a 64 B pair then
costs a few microseconds, bench/bench_fastpath.py).  Closing the cache, fork() and shared mode all
work the same way: the stop byte the fast path reads is swapped for a local non-zero byte, which
sends every call to the slow path, and its `inside` byte for a local one, so that only the slow
path (under the lock) writes the slot's.

One module although it is over 400 lines: the fast path, the slow paths and the large cache of one
P share every piece of its state (lists, map view, stop and inside bytes, P lock) and its invariants.
"""

import _thread
import operator
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, SupportsIndex

from . import layout as L
from . import world
from .central import tag
from .errors import ArenaClosed, BadHandle, BadSize, BadSizeType, ForeignReference, ForkedHeap, OutOfMemory
from .locks import Stopped
from .sizeclasses import CLASS_TO_SIZE, MAX_SMALL_SIZE, SIZE_TO_CLASS

if TYPE_CHECKING:
    from .arena import Arena

SL = L.SLOT
S = L.SPAN
_LARGE = 255  # cpclass value of a large span's first page
_COARSE = 255  # pclass value past the fine pages: a coarse handle, whose page cpclass holds
_CLOSED = bytearray(b"\x03")  # stop byte of a closed or forked cache: every call takes the slow path
_CLOSED_W = L.HDR["closed"]  # header word: the arena was closed for good (shm/world.py)
_SHARED = bytearray(b"\x04")  # stop byte of a cache in shared mode: every call takes the locked path
LARGE_CACHE_SPANS = 8  # freed large spans a P keeps, at most: each is charged at least 1/8 of the
# budget below, because a snapshot gives every one of them back to the page heap during its pause
LARGE_CACHE_MAX = 256 << 20  # bytes of freed large spans a P keeps for reuse, at most (and at most
# a quarter of the heap); a free past it goes back to the page heap
LARGE_RFREE_BYTES = LARGE_CACHE_MAX  # bytes of other Ps' large blocks whose frees wait in a P's
# remote-free buffer, about, at most (and at most a quarter of the heap), before it is applied.
# Their owners take them back out of it as they need them (LargeObjects.take_back); the bound is
# for an owner that does not allocate again, whose pages would otherwise wait for 256 frees (a
# gigabyte of 4 MiB blocks)
RFREE_KEEP = L.RFREE_CAP // 4  # frees of other Ps' large blocks that a full remote-free buffer keeps
# for their owners to take back, at most (and at most half of LARGE_RFREE_BYTES); more are applied
LARGE_PENDING_SPANS = L.RFREE_CAP  # large spans other Ps freed that a P leaves waiting for its next
# large allocations, at most (and at most LARGE_CACHE_MAX bytes): one remote-free buffer's worth


class Block(tuple):
    """An allocated block: (handle, size asked, capacity usable, heap).  A tuple, so that making
    one on the fast path costs one C call."""

    __slots__ = ()

    @property
    def handle(self) -> int:
        """int: the block's handle (its place in the heap and its generation: shm/layout.py)"""
        return self[0]

    @property
    def size(self) -> int:
        """bytes asked for"""
        return self[1]

    @property
    def capacity(self) -> int:
        """usable bytes (the size class, or whole pages)"""
        return self[2]

    @property
    def buf(self) -> memoryview:
        """Zero-copy memoryview of the block's `size` bytes."""
        return self[3]._own_view(self[0], self[1])

    def __repr__(self) -> str:
        return f"Block(handle={self[0]}, size={self[1]}, capacity={self[2]})"

    def __int__(self) -> int:
        return self[0]

    __index__ = __int__

    def __enter__(self) -> "Block":
        return self

    def __exit__(self, *exc: object) -> None:
        """`with heap.alloc(n) as blk:` frees the block on exit (through the heap that made it)."""
        self[3].free(self[0])

    # Pickling: client/pool.py registers a reducer with copyreg (a Block pickles as a reference
    # to its memory, never its bytes); shm needs no hook and never imports client.


_registered_pid = 0
_registered = False


def _register_barrier():
    """membarrier registration, once per process (shm/world.py)."""
    global _registered_pid, _registered
    if _registered_pid != os.getpid():
        _registered = world.register_process()
        _registered_pid = os.getpid()
    return _registered


class ProcessCache:
    """A P: one slot of the arena, its local cache, and the fast path."""

    # The fast path: closures made by _bind_fast_path (their docstrings say what they do).
    alloc: Callable[[int], Block]
    free: Callable[[Block | SupportsIndex], None]
    view: Callable[..., memoryview]  # (handle, size=None): a live block of any process
    _own_view: Callable[[int, int], memoryview]  # (handle, size): Block.buf
    _set_stop: Callable[[bytearray | memoryview, bytearray | memoryview], None]
    _charged: Callable[..., int]  # (pages=0, reset=False): the large cache's charge, after adding pages

    def __init__(self, arena: "Arena", slot: int | None = None) -> None:
        self.arena = arena
        self.barrier = _register_barrier()
        self.slot = arena.registry.claim(self.barrier) if slot is None else slot
        lay = arena.lay
        k = self.slot
        self.pid = os.getpid()
        self.owner_thread = _thread.get_ident()  # the thread whose calls may take the fast path
        self.shared = False
        self._tag = tag(k)
        self._lists: list[list[int]] = [[] for _ in range(L.NCLASS)]  # LISTED handles, by class
        # Class of a span we cache, by page.  pclass: fine index >> 10 (page + 1) -> class, then
        # _COARSE where coarse indexes land (index >> 10 of each, heap_pages + 1 on): the fast
        # path finds a fine handle's class with one shift and one subscript, and goes to
        # cpclass for a coarse one: (index - handle_c0) >> 6 (page) -> class, or _LARGE.
        self._pclass = bytearray(lay.heap_pages + 1) + bytes((_COARSE,)) * (lay.heap_pages // 16 + 2)
        self._cpclass = bytearray(lay.heap_pages)
        self._lcache: dict[int, list[int]] = {}  # pages -> LISTED large handles we keep
        self._lnp: dict[int, int] = {}  # handle >> GEN_BITS -> pages, of the large spans we own
        # Frees of large blocks in our remote-free buffer and their pages, about (fewer when a
        # flush applied it): at _rlcap pages the buffer is applied.  Third: how many of them the
        # last apply of the full buffer kept at its start (RFREE_KEEP): the next applies those.
        self._rlarge = [0, 0, 0]
        self._rlcap = min(LARGE_RFREE_BYTES, lay.heap_max // 4) >> L.PAGE_SHIFT
        self._rseen: dict[int, tuple[int, int]] = {}  # P -> (entries of its remote-free buffer we
        # looked at, the last of them as read then)
        self._lcap = min(LARGE_CACHE_MAX, lay.heap_max // 4) >> L.PAGE_SHIFT
        self._lmin = self._lcap // LARGE_CACHE_SPANS  # the least a cached span is charged
        self._lock = threading.Lock()
        # The allocation and generation maps (both parts), indexed by handle >> GEN_BITS: each view starts
        # HANDLE_G0 bytes early (bytes of the region before, never read: every handle the fast
        # path reads them for is >= HANDLE_MIN) and ends with the map (IndexError past it).
        g0 = L.HANDLE_G0
        self._amap = arena.view(lay.amap_off - g0, lay.amap_off + lay.amap_bytes)
        self._gmap = arena.view(lay.gmap_off - g0, lay.gmap_off + lay.amap_bytes)
        self._sw = sw = lay.slot_word(k)
        self._shm_stop = arena.view((sw + SL["stop"]) * 8, (sw + SL["stop"]) * 8 + 1)
        self._inside = arena.view((sw + SL["inside"]) * 8, (sw + SL["inside"]) * 8 + 1)
        # A call's first operation may wait for its first lock outside the call (Op.acquire);
        # the call starts again when it raises Stopped.
        self._gate = (self._inside, self._shm_stop)
        self._relists = arena.words(sw + L.SLOT_RELISTS_AT, L.NCLASS)
        self._rbuf = arena.words(sw + L.SLOT_RFREE_AT, L.RFREE_CAP)
        self._rfree_n = arena.words(sw + SL["rfree_n"], 1)
        self._lgrel = arena.words(sw + SL["lg_relists"], 2)  # lg_relists, lg_relist_pages
        self._flush_gen = arena.q[sw + SL["synced_gen"]] = arena.q[sw + SL["flush_gen"]]
        self._dead = False  # closed, or inherited through fork(): view() refuses
        self.parks = 0
        _CACHES.add(self)
        self._bind_fast_path()

    # --- the fast path ------------------------------------------------------------------
    def _bind_fast_path(self):
        """Make `self.alloc` and `self.free`: closures over everything they touch (a cell read
        is several times cheaper than an attribute lookup)."""
        lists, amap, gmap, tag_k = self._lists, self._amap, self._gmap, self._tag
        pclass, cpclass, relists, lcache, lnp, lcap, lmin = (
            self._pclass,
            self._cpclass,
            self._relists,
            self._lcache,
            self._lnp,
            self._lcap,
            self._lmin,
        )
        lcached = 0  # pages charged for the large spans in lcache: at least lmin each (charged())
        rbuf, rfree_n, lgrel, rlarge, rlcap = (
            self._rbuf,
            self._rfree_n,
            self._lgrel,
            self._rlarge,
            self._rlcap,
        )
        owner, get_ident = self.owner_thread, _thread.get_ident
        stop, inside = self._shm_stop, self._inside  # cells: _set_stop() swaps them
        slow_alloc, slow_free = self._slow_alloc, self._slow_free
        s2c, c2s, B, MAXS = SIZE_TO_CLASS, CLASS_TO_SIZE, Block, MAX_SMALL_SIZE
        LISTED, ALLOC, RFREED, TAG0, RCAP = L.LISTED, L.ALLOC, L.RFREED, L.TAG0, L.RFREE_CAP
        LARGE, COARSE, PSHIFT, PMASK = _LARGE, _COARSE, L.PAGE_SHIFT, L.PAGE_SIZE - 1
        GB, GM, G0, GPS = L.GEN_BITS, L.GEN_MASK, L.HANDLE_G0, L.FINE_PAGE_SHIFT
        arena = self.arena
        hint0, SLW = arena.lay.slot_word(0) + SL["lg_rhint"], arena.lay.slot_words
        C0, CPS = arena.lay.handle_c0, L.COARSE_PAGE_SHIFT
        q, mv, pm, sw0, capacity = (
            arena.q,
            arena.mv,
            arena.lay.pagemap_word(),
            arena.lay.span_word(0),
            arena.block_capacity,
        )
        CPM, SW, SC, NPG = (1 << CPS) - 1, L.SPAN_WORDS, S["sizeclass"], S["npages"]

        def alloc(size):
            """A Block of at least `size` bytes (not zeroed).  OutOfMemory when full."""
            nonlocal lcached
            try:
                if size <= MAXS:
                    if size > 0 and get_ident() == owner:
                        c = s2c[(size + 7) >> 3]
                        lst = lists[c]
                        if lst:
                            ins = inside
                            ins[0] = 1
                            try:
                                if not stop[0]:
                                    h = lst.pop()
                                    amap[h >> GB] = tag_k
                                    return B((h, size, c2s[c], self))
                            finally:
                                ins[0] = 0
                elif get_ident() == owner:
                    npg = (size + PMASK) >> PSHIFT
                    lst = lcache.get(npg)
                    if lst:
                        ins = inside
                        ins[0] = 1
                        try:
                            if not stop[0]:
                                h = lst.pop()
                                amap[h >> GB] = tag_k
                                lcached -= npg if npg > lmin else lmin
                                return B((h, size, npg << PSHIFT, self))
                        finally:
                            ins[0] = 0
            except TypeError:  # no int: raised by the tests above, before anything is written
                pass
            return slow_alloc(size)

        def free_coarse(h, i, g, c):
            """The rest of free() for a block of ours of coarse class c: True when done, else
            False (the slow path).  Out of free()'s body, which it would lengthen past what
            keeps its hot jumps short (CPython 3.11 specializes a comparison only when the
            jump after it needs no EXTENDED_ARG)."""
            ins = inside
            ins[0] = 1
            try:
                if not stop[0]:
                    h = h + 1 if g != GM else h - GM
                    gmap[i] = h & GM  # first: a crash after it leaks the block, never reuses h
                    relists[c] += 1  # a crash here over-counts, never under
                    amap[i] = LISTED
                    lists[c].append(h)
                    return True
            finally:
                ins[0] = 0
            return False

        def free_large_remote(h, i, b, w):
            """The rest of free() for another P's large block (live, h its handle, b its map
            byte, w its span's record word): buffered as a small one is, and counted with its
            pages (rlarge); the free that brings them to LARGE_RFREE_BYTES takes the slow path,
            which applies the buffer if those still waiting (not taken back) reach it too.  Its
            owner, if it has one, is told (lg_rhint): it may take the block back out of the
            buffer.  Out of free()'s body, as free_coarse is."""
            ins = inside
            ins[0] = 1
            try:
                n = rfree_n[0]
                if n >= rlarge[0]:
                    c, p = rlarge[0], rlarge[1]
                else:  # fewer buffered: a flush applied them
                    c = p = rlarge[2] = 0
                npg = q[w + NPG]
                if p + npg < rlcap and n < RCAP and not stop[0]:
                    rbuf[n] = h
                    rfree_n[0] = n + 1
                    amap[i] = RFREED  # a second free now fails at once
                    rlarge[0] = c + 1
                    rlarge[1] = p + npg
                    if b != ALLOC:
                        q[hint0 + (b - TAG0) * SLW] = 1  # after RFREED: its owner looks for it
                    return
            finally:
                ins[0] = 0
            slow_free(h)

        def free(block):
            """Free a Block or an int handle allocated by any process.  BadHandle or
            DoubleFree for anything that is not a live block (a stale handle, whose block was
            freed since, included); nothing changes then."""
            nonlocal lcached
            cls = block.__class__
            # A Block of another P of this arena (a consumer freeing a producer's Block) is read
            # here too; one of another arena goes to _handle, which refuses it.
            h = (
                block[0]
                if cls is B and (block[3] is self or block[3].arena is arena)
                else block
                if cls is int
                else _handle(block, self)
            )
            if get_ident() == owner:
                i = h >> GB
                try:
                    b = amap[i] if i >= G0 else 0  # the views start HANDLE_G0 bytes early
                    # Three branches, each body short enough that the jumps of the comparisons
                    # before it need no EXTENDED_ARG (see free_coarse): a fine block of ours;
                    # anything else but a coarse block of ours (another P's block, or bad);
                    # a coarse block of ours -- a large one, or of a coarse class.
                    if b == tag_k and (c := pclass[i >> GPS]) != COARSE and gmap[i] == (g := h & GM):
                        ins = inside
                        ins[0] = 1
                        try:
                            if not stop[0]:
                                gmap[i] = g + 1  # first: a crash after it leaks the block, never reuses h
                                relists[c] += 1  # a crash here over-counts, never under
                                amap[i] = LISTED
                                lists[c].append(h + 1)
                                return
                        except ValueError:  # generation 255: the next is 0 (h + 1 would carry)
                            gmap[i] = 0
                            relists[c] += 1
                            amap[i] = LISTED
                            lists[c].append(h - GM)
                            return
                        finally:
                            ins[0] = 0
                    elif b != tag_k or c != COARSE or gmap[i] != (g := h & GM):
                        if (b == ALLOC or b >= TAG0) and gmap[i] == h & GM:
                            # A large block starts a page of the maps' coarse part: its free is
                            # counted, so that few such frees wait (rlarge).
                            if (
                                i >= C0
                                and not (i - C0) & CPM
                                and q[(w := sw0 + (q[pm + ((i - C0) >> CPS)] - 1) * SW) + SC] == 0
                            ):
                                return free_large_remote(h, i, b, w)
                            ins = inside
                            ins[0] = 1
                            try:
                                n = rfree_n[0]
                                if n < RCAP and not stop[0]:
                                    rbuf[n] = h
                                    rfree_n[0] = n + 1
                                    amap[i] = RFREED  # a second free now fails at once
                                    return
                            finally:
                                ins[0] = 0
                    elif (c := cpclass[(i - C0) >> CPS]) != LARGE:
                        if free_coarse(h, i, g, c):
                            return
                    elif (npg := lnp.get(i, 0)) and lcached + (ch := npg if npg > lmin else lmin) <= lcap:
                        # Ours and large: into the large cache, within its bound.
                        ins = inside
                        ins[0] = 1
                        try:
                            if not stop[0]:
                                gmap[i] = g + 1  # first, as above
                                lgrel[0] += 1
                                lgrel[1] += npg
                                amap[i] = LISTED
                                lst = lcache.get(npg)
                                if lst is None:
                                    lcache[npg] = [h + 1]
                                else:
                                    lst.append(h + 1)
                                lcached += ch
                                return
                        except ValueError:  # generation 255 (nothing written): the slow path
                            pass
                        finally:
                            ins[0] = 0
                except IndexError:  # past the heap: the slow path says so
                    pass
            slow_free(h)

        SC, START, NPAGES, SPAN_WORDS = S["sizeclass"], S["start"], S["npages"], L.SPAN_WORDS
        hb = arena.lay.heap_off

        def view(handle, size=None):
            """Zero-copy memoryview of the live block at `handle` (allocated by any process): its
            whole capacity, or its first `size` bytes."""
            if stop[0]:  # closed, forked, shared, stopped, or the arena closed for good
                self._check_view()
            h = handle if handle.__class__ is int else _handle(handle, self)
            i = h >> GB
            try:
                b = amap[i] if i >= G0 and gmap[i] == h & GM else 0
            except IndexError:
                b = 0
            d = (i - G0) << 3 if i < C0 else (i - C0) << 7
            if b != ALLOC and b < TAG0:
                cap = capacity(h)  # raises with the reason
            else:
                w = sw0 + (q[pm + (d >> PSHIFT)] - 1) * SPAN_WORDS
                c = q[w + SC]
                off = d - (q[w + START] << PSHIFT)
                cap = c2s[c] if c else q[w + NPAGES] << PSHIFT
                if w < sw0 or (off % cap if c else off):
                    cap = capacity(h)  # raises with the reason
            if size is None:
                size = cap
            elif not 0 <= size <= cap:
                raise BadHandle(f"view of {size} bytes of a block of {cap}")
            d += hb
            return mv[d : d + size]

        def own_view(h, size):
            """view(h, size) for Block.buf: a live block of a span we cache (map byte our tag,
            generation the handle's -- so at an object's start, as a free's fast path reads it)
            needs no span lookup: its class is the page's in pclass, its place the handle's.
            Anything else, a Block freed since or one made by hand included, goes to view(),
            which says why it is no live block."""
            try:
                if not stop[0]:
                    i = h >> GB
                    if i >= G0 and amap[i] == tag_k and gmap[i] == h & GM:
                        c = pclass[i >> GPS]
                        if c != COARSE and 0 <= size <= c2s[c]:
                            d = ((i - G0) << 3) + hb
                            return mv[d : d + size]
            except (IndexError, TypeError):  # past the heap, or no int: view() says so
                pass
            return view(h, size)

        def set_stop(stop_view, inside_view):
            nonlocal stop, inside
            stop, inside = stop_view, inside_view

        def charged(pages=0, reset=False):
            """Add `pages` to the large cache's charge, or with `reset` set it to 0 (the slow
            paths, under the P lock); returns the charge."""
            nonlocal lcached
            lcached = 0 if reset else lcached + pages
            return lcached

        self.alloc, self.free, self.view, self._set_stop = alloc, free, view, set_stop
        self._own_view = own_view
        self._charged = charged

    # --- entering a call the slow way (under the P lock) ----------------------------------
    def _enter(self):
        """Caller holds the P lock.  Returns with the slot's `inside` set and its stop byte RUN:
        parks first if the daemon asks, drops the local lists if the daemon flushed them.  The
        caller clears `inside` when its call ends (_leave)."""
        if not self.shared and _thread.get_ident() != self.owner_thread:
            self._check_usable()
            self.shared = True
            self._set_stop(_SHARED, bytearray(1))
            self._wait_not_inside()
        self._check_usable()
        inside, stop = self._inside, self._shm_stop
        q, sw = self.arena.q, self._sw
        while True:
            inside[0] = 1
            s = stop[0]
            if s == L.STOP_RUN and not q[_CLOSED_W]:
                return
            if s == L.STOP_RESYNC and not q[_CLOSED_W]:
                self._resync()
                q[sw + SL["stop"]] = L.STOP_RUN  # inside a call: see shm/world.py
                continue
            inside[0] = 0
            if s == L.STOP_CLOSED or q[_CLOSED_W]:
                raise world.closed_error(self.arena)  # closed for good (world.close_for_good)
            self.parks += 1
            world.park(self.arena, self.slot, q[sw + SL["stop_epoch"]])

    def _leave(self):
        self._inside[0] = 0

    def _wait_not_inside(self):
        """Caller holds the P lock: wait for the owner thread to leave the fast path."""
        inside = self._inside
        while inside[0]:
            time.sleep(0)

    def _resync(self):
        """Our cache was flushed by someone else (the daemon, while we were stopped): every local
        list and the large cache are stale.  The large spans we own stay ours (a snapshot does not
        disown them), so what we know of them stays."""
        if self.arena.q[self._sw + SL["flush_gen"]] != self._flush_gen:
            self._drop_local(keep_owned=True)

    def _drop_local(self, keep_owned=False):
        for lst in self._lists:
            lst.clear()
        self._lcache.clear()
        if keep_owned:  # forget the spans the flush gave back (they were LISTED, not ours now)
            amap, tag_k = self._amap, self._tag
            for i in [i for i in self._lnp if amap[i] != tag_k]:
                del self._lnp[i]
        else:
            self._lnp.clear()
        self._charged(reset=True)
        # Said in the slot before this call does anything: from here on the cache may hold what
        # the next flush must give back (Arena.flushed_clean).
        q = self.arena.q
        self._flush_gen = q[self._sw + SL["synced_gen"]] = q[self._sw + SL["flush_gen"]]

    def closed_or_forked(self):
        return self._closed or os.getpid() != self.pid

    # --- the slow paths -----------------------------------------------------------------
    def _slow_alloc(self, size):
        if size.__class__ is not int:
            try:
                size = operator.index(size)
            except TypeError:
                raise BadSizeType(f"alloc size must be an int, got {type(size).__name__} {size!r}") from None
        if size < 0:
            raise BadSize(f"alloc size must be >= 0, got {size}")
        return self._call(self._alloc_locked, size)

    def _call(self, fn, arg):
        """fn(arg) as a slow-path call: under the P lock, inside (_enter, _leave).  Started again
        when its first operation found the P stopped while it waited for its first lock outside
        the call (Stopped, Op.acquire): the next _enter parks, then resyncs."""
        with self._lock:
            while True:
                self._enter()
                try:
                    return fn(arg)
                except Stopped:
                    continue
                finally:
                    self._leave()

    def _alloc_locked(self, size):
        """alloc() with the P lock held and inside a call."""
        if size > MAX_SMALL_SIZE:
            return self._alloc_large(size)
        c = SIZE_TO_CLASS[(size + 7) >> 3] if size else 1  # malloc(0): a distinct, freeable block
        lst = self._lists[c]
        h = lst.pop() if lst else self._refill(c)
        self._amap[h >> L.GEN_BITS] = self._tag
        return Block((h, size, CLASS_TO_SIZE[c], self))

    def _alloc_large(self, size):
        arena, k = self.arena, self.slot
        if size > arena.lay.heap_max:
            raise OutOfMemory(f"alloc of {size} bytes exceeds the whole heap ({arena.lay.heap_max} bytes)")
        npg = (size + L.PAGE_SIZE - 1) >> L.PAGE_SHIFT
        lst = self._lcache.get(npg)
        q, sw = arena.q, self._sw
        cands = self._freed_elsewhere(npg) if not lst and q[sw + SL["lg_rhint"]] else []
        took = not lst and (cands or q[sw + SL["lg_pending"]])
        if took:
            # Other Ps freed some of our large blocks: take them back into the large cache, out
            # of their remote-free buffers (cands) or our pending list -- making room in it
            # first if blocks of other sizes fill it (the P moved on to another size: they
            # would keep out the ones it wants now until a flush).
            charge = max(npg, self._lmin)
            stale = []
            if self._lcap - self._charged() < charge:
                stale = self._stale_listed(npg)
            room = self._lcap - self._charged() + sum(max(n, self._lmin) for n, _ in stale)

            def collect(op):
                op.acquire(L.LOCK_HEAP)
                arena.large.give_back_listed(op, k, [h for _, h in stale])
                taken = arena.large.take_back(op, k, cands, room, self._lmin)
                left = room - sum(max(n, self._lmin) for _, n in taken)
                kept, gone = arena.large.collect_pending(
                    op, k, left, self._lmin, self._lcap, LARGE_PENDING_SPANS, npg
                )
                return taken + kept, gone

            kept, gone = arena.run(k, collect)
            if cands:
                # Ours that it had no room for: the next look reads their buffers from them, and
                # comes at the next allocation its cache cannot serve (the hint set again: no free
                # need come first -- else those would wait for their buffer's apply while the
                # allocations took new spans from the heap).
                taken, seen = {g for g, _ in kept}, self._rseen
                for j, m, h in cands:
                    if L.next_handle(h) not in taken:
                        q[sw + SL["lg_rhint"]] = 1
                        if m < seen[j][0]:
                            at = arena.lay.slot_word(j) + L.SLOT_RFREE_AT
                            seen[j] = (m, q[at + m - 1] if m else 0)
            self._forget_listed(stale)
            for g in gone:
                self._lnp.pop(g >> L.GEN_BITS, None)
            for g, n in kept:
                self._lnp[g >> L.GEN_BITS] = n
                self._lcache.setdefault(n, []).append(g)
                self._charged(max(n, self._lmin))
            lst = self._lcache.get(npg)
        if lst:
            h = lst.pop()
            self._charged(-max(npg, self._lmin))
        else:

            def alloc(op):
                op.acquire(L.LOCK_HEAP)
                return arena.large.alloc(op, npg, k)

            # The call's first operation, unless it took blocks back first: it may start again.
            h = arena.run(k, alloc, gate=None if took else self._gate)
            self._lnp[h >> L.GEN_BITS] = npg
            self._cpclass[arena.lay.handle_page(h)] = _LARGE
        self._amap[h >> L.GEN_BITS] = self._tag
        return Block((h, size, npg << L.PAGE_SHIFT, self))

    def _stale_listed(self, npg, need=None):
        """[(pages, handle)] of the spans in our large cache of another size than `npg` pages:
        all of them, or with `need` the first whose charges reach `need` pages (the sizes
        cached first first, each size's oldest first; [] if all of them would not)."""
        stale = [(n, h) for n, hs in self._lcache.items() if n != npg for h in hs]
        if need is None:
            return stale
        for j, (n, _) in enumerate(stale):
            need -= max(n, self._lmin)
            if need <= 0:
                return stale[: j + 1]
        return []

    def _forget_listed(self, spans):
        """Spans of our large cache given back to the heap (give_back_listed): out of it."""
        for n, g in spans:
            self._lcache[n].remove(g)
            self._lnp.pop(g >> L.GEN_BITS, None)
            self._charged(-max(n, self._lmin))

    def _freed_elsewhere(self, want):
        """Our large blocks that other Ps freed, read from their remote-free buffers without a
        lock (LargeObjects.take_back checks each under the heap lock): [(P, entry, handle)],
        those of `want` pages first.  Clears our hint (lg_rhint) first: a P that buffers one
        after we read its buffer sets it again.  Each buffer is read from where the last look
        stopped, or from the first of ours that look had no room for: a buffer only grows until
        it is applied, and one applied since (shorter, or its entry before that place no longer
        the one read there, nor 0) is read from its start."""
        arena, lay = self.arena, self.arena.lay
        q, k, lnp, seen = arena.q, self.slot, self._lnp, self._rseen
        q[self._sw + SL["lg_rhint"]] = 0
        stride, first = lay.slot_words, lay.slot_word(0) + SL["rfree_n"]
        counts = q[first : first + len(arena.registry.claimed()) * stride : stride].tolist()
        cached = {h >> L.GEN_BITS for hs in self._lcache.values() for h in hs}
        found = []
        for j, n in enumerate(counts):
            if not n or j == k:
                continue
            n = min(n, L.RFREE_CAP)
            at = lay.slot_word(j) + L.SLOT_RFREE_AT
            m0, last = seen.get(j, (0, 0))
            if m0 > n or (m0 and q[at + m0 - 1] not in (last, 0)):
                m0 = 0  # applied since
            elif m0 == n:
                continue
            seen[j] = (n, q[at + n - 1])
            for m, h in enumerate(q[at + m0 : at + n].tolist(), m0):
                npg = lnp.get(h >> L.GEN_BITS)
                if npg and h >> L.GEN_BITS not in cached:
                    found.append((npg != want, j, m, h))
        found.sort()
        return [(j, m, h) for _, j, m, h in found]

    def _slow_free(self, h):
        self._call(self._free_locked, h)

    def _free_locked(self, h):
        """free() with the P lock held and inside a call."""
        if h.__class__ is not int:
            h = _handle(h, self)
        i, g = h >> L.GEN_BITS, h & L.GEN_MASK
        if h < L.HANDLE_MIN or i >= len(self._amap) or self._gmap[i] != g:
            return self.arena.free(h, self.slot)  # raises: out of range, stale, or a double free
        b = self._amap[i]
        if b == self._tag:
            h2 = L.next_handle(h)
            c = self._class_of(i)
            if c != _LARGE:
                self._gmap[i] = h2 & L.GEN_MASK
                self._relists[c] += 1
                self._amap[i] = L.LISTED
                self._lists[c].append(h2)
                return
            npg = self._lnp.get(i, 0)
            over = self._charged() + max(npg, self._lmin) - self._lcap
            if npg and over > 0 and (stale := self._stale_listed(npg, over)):
                # No room, for spans of other sizes fill the cache: the P moved on to another
                # size.  Enough of those go back to the heap, the oldest first, and this one is
                # kept -- else every pair of the new size took the heap lock twice, until a
                # flush emptied the cache.  (One locked operation, as the free to the heap.)
                def give_back(op):
                    op.acquire(L.LOCK_HEAP)
                    self.arena.large.give_back_listed(op, self.slot, [g for _, g in stale])

                self.arena.run(self.slot, give_back)
                self._forget_listed(stale)
            if npg and self._charged() + max(npg, self._lmin) <= self._lcap:
                self._gmap[i] = h2 & L.GEN_MASK
                self._lgrel[0] += 1
                self._lgrel[1] += npg
                self._amap[i] = L.LISTED
                self._lcache.setdefault(npg, []).append(h2)
                self._charged(max(npg, self._lmin))
                return
            self._lnp.pop(i, None)
            return self.arena.free(h, self.slot)  # over the cache's bound: to the page heap
        if b == L.ALLOC or b >= L.TAG0:
            rlarge = self._rlarge
            if self._rfree_n[0] < rlarge[0]:  # applied meanwhile (a flush): count afresh
                rlarge[:] = [0, 0, 0]
            if self._rfree_n[0] >= L.RFREE_CAP:
                self._apply_full(self._gate)  # first: may start again
            n = self._rfree_n[0]
            self._rbuf[n] = h
            self._rfree_n[0] = n + 1
            self._amap[i] = L.RFREED
            npg = self._large_pages(i)
            if npg:
                if b != L.ALLOC:  # its owner may take it back out of the buffer
                    self.arena.q[self.arena.lay.slot_word(b - L.TAG0) + SL["lg_rhint"]] = 1
                rlarge[0] += 1
                rlarge[1] += npg
                if rlarge[1] >= self._rlcap:
                    # Their owners took some back (entries 0): count what still waits, about
                    # (their mean size), and apply only if that reaches the bound.
                    taken = self._rbuf[: n + 1].tolist().count(0)
                    rlarge[1] = (rlarge[0] - min(taken, rlarge[0])) * rlarge[1] // rlarge[0]
                    if rlarge[1] >= self._rlcap:
                        self.arena.apply_buffered_frees(self.slot)
                        rlarge[:] = [0, 0, 0]
            return
        self.arena.free(h, self.slot)  # not a live object: raises BadHandle or DoubleFree

    def _apply_full(self, gate=None):
        """Apply our full remote-free buffer, but for the frees of large blocks whose owners may
        still take them back (a producer's, freed by us, its consumer): kept at its start, and
        counted in rlarge (their pages about: the mean of those counted)."""
        c, p, old = self._rlarge
        self.arena.apply_buffered_frees(
            self.slot, gate=gate, keep=RFREE_KEEP, keep_pages=self._rlcap // 2, old=old
        )
        kept = self._rfree_n[0]
        self._rlarge[:] = [kept, kept * p // c if c else 0, kept]

    def _large_pages(self, i):
        """The pages of the large block (of any P) index i starts (handle >> GEN_BITS, checked),
        or 0 if it starts none."""
        lay, q = self.arena.lay, self.arena.q
        if i < lay.handle_c0 or (i - lay.handle_c0) & ((1 << L.COARSE_PAGE_SHIFT) - 1):
            return 0
        r = self.arena.heap.span_of_page(lay.index_page(i - L.HANDLE_G0))
        w = lay.span_word(r)
        return q[w + S["npages"]] if r >= 0 and q[w + S["sizeclass"]] == 0 else 0

    def _class_of(self, i):
        """The class of the span we cache that holds index i (handle >> GEN_BITS), or _LARGE."""
        c = self._pclass[i >> L.FINE_PAGE_SHIFT]
        return c if c != _COARSE else self._cpclass[(i - self.arena.lay.handle_c0) >> L.COARSE_PAGE_SHIFT]

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
                    return r, got
                central.uncache_span(op, c, r, k)
            return central.cache_span(op, c, k)

        r, lst = arena.run(k, refill, gate=self._gate)  # the call's first operation: it may start again
        w = arena.lay.span_word(r)
        start, npages = arena.q[w + S["start"]], arena.q[w + S["npages"]]
        if L.CLASS_COARSE[c]:
            self._cpclass[start : start + npages] = bytes((c,)) * npages
        else:
            self._pclass[start + 1 : start + 1 + npages] = bytes((c,)) * npages
        self._lists[c][:] = lst
        return self._lists[c].pop()

    def park_now(self) -> None:
        """Called by the control thread (the cooperative protocol, shm/world.py): park for the
        pending request, if any.  Holds the P lock, so no slow path runs; waits for the owner to
        leave the fast path, whose next call then sees the stop byte (the GIL orders the two
        threads) and waits for this lock.  It neither switches the cache to shared mode nor
        drops its lists: the owner's next call resyncs itself."""
        with self._lock:
            if self.closed_or_forked() or self._shm_stop[0] != L.STOP_PARK:
                return
            self._wait_not_inside()
            self.parks += 1
            world.park(self.arena, self.slot, self.arena.q[self._sw + SL["stop_epoch"]])

    def flush(self) -> None:
        """Give every cached span back to the central lists and apply the remote-free buffer
        (Go: mcache.releaseAll) -- by the P itself."""
        with self._lock:
            self._wait_not_inside()
            self._enter()
            try:
                self.arena.flush_cache(self.slot, actor=self.slot)
                self._drop_local()
            finally:
                self._leave()

    def _check_view(self):
        """view() with a non-zero stop byte: refuse if this P may not be used, or its arena was
        closed for good; a stop or resync request does not concern a view."""
        if self._dead:
            self._check_usable()
        if self.arena.q[_CLOSED_W]:
            raise world.closed_error(self.arena)

    def arena_closed(self) -> bool:
        """Was this P's arena closed for good (shm/world.py close_for_good)?  Its calls raise
        ArenaClosed; close() still works."""
        return not self.arena.closed and self.arena.q[_CLOSED_W] != 0

    def _check_usable(self):
        if os.getpid() != self.pid:
            raise ForkedHeap(
                "this Heap belongs to the parent process (pid %d); call client.connect() "
                "in the child to get a P of its own" % self.pid
            )
        if self._closed:
            raise ArenaClosed("this heap is closed")

    _closed = False

    def close(self) -> None:
        """Flush the cache and give the slot back.  The arena stays attached (Arena.close)."""
        with self._lock:
            if self._closed or os.getpid() != self.pid:
                self._closed = self._dead = True
                self._set_stop(_CLOSED, bytearray(1))
                return
            self._set_stop(_CLOSED, bytearray(1))
            self._wait_not_inside()
            if self.arena.q[_CLOSED_W]:  # closed for good: nothing to flush into, no slot to give
                self._closed = self._dead = True
                self._drop_local()
                return
            self._enter()  # a snapshot waiting for this P: park for it first
            try:
                self._closed = self._dead = True
                self.arena.flush_cache(self.slot, actor=self.slot)
                self._drop_local()
            finally:
                self._leave()
            self.arena.registry.give_back(self.slot)

    def _after_fork_in_child(self):
        # Every call of the child now takes the slow path, which raises ForkedHeap.
        self._dead = True
        self._set_stop(_CLOSED, bytearray(1))


_CACHES: "weakref.WeakSet[ProcessCache]" = weakref.WeakSet()


def _after_fork_in_child():
    for cache in list(_CACHES):
        cache._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _handle(block, cache):
    """The handle `block` stands for in `cache`'s arena: an int, a Block, or an object with
    __index__ (a heap array, client/arrays.py).  A Block -- or the `block` of an object that has
    one -- of another arena is refused: its handle would name some other memory here."""
    if block.__class__ is int:
        return block
    owner = block if isinstance(block, Block) else getattr(block, "block", None)
    if isinstance(owner, Block):
        heap = owner[3]
        if heap is not cache and heap.arena is not cache.arena:
            theirs, ours = heap.arena.arena_id, cache.arena.arena_id
            if theirs != ours:
                raise ForeignReference(
                    f"{owner!r} belongs to arena {theirs:#018x}, not to this heap's arena {ours:#018x} "
                    "(another daemon's, or one closed since): its handle names other memory here"
                )
        if owner is block:
            return block[0]  # another Heap's Block of this arena (a P's own takes the fast path)
    try:
        return block.__index__()
    except AttributeError:
        raise BadHandle(f"free() takes a Block or an int handle, got {type(block).__name__}") from None
