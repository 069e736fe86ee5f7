"""Arena: the segment, attached in one process.  See shm/__init__.py for an overview.

`Arena.create` (the daemon, or a test) reserves the segment and writes the header;
`Arena.attach` (a worker) maps it and refuses anything whose magic, version or sizes disagree.
The arena ties the pieces together: locks (locks.py), page heap (heap.py), central lists
(central.py); P slots are claimed here and used by ProcessCache (cache.py); statistics are in
stats.py.
"""

import os
import threading
import time
from multiprocessing import shared_memory

from . import layout as L
from . import stats as _stats
from .central import CentralList
from .errors import ArenaClosed, BadHandle, CorruptionError, DoubleFree, NoFreeSlot
from .heap import PageHeap
from .locks import Locks, Op, Retry, ofd_held_elsewhere, ofd_trylock, ofd_unlock
from .sizeclasses import CLASS_TO_SIZE

S = L.SPAN
H = L.HEAP
C = L.CENTRAL
SL = L.SLOT
PAGE = L.PAGE_SIZE


def unlink_segment(name):
    """Remove /dev/shm/<name> without the resource tracker (which never tracked it).
    Returns False when it did not exist."""
    import _posixshmem
    try:
        _posixshmem.shm_unlink("/" + name.lstrip("/"))
        return True
    except FileNotFoundError:
        return False


_track_lock = threading.Lock()


def _open_segment(name, create, size=0):
    """SharedMemory without the resource tracker.  Python < 3.13 registers every segment it
    opens -- attached ones too -- with the tracker, which unlinks them when the process exits
    (cpython#82300); the arena's life is the daemon's to decide.  3.13 has track=False; before
    it, registration is switched off around the constructor."""
    try:
        return shared_memory.SharedMemory(name=name, create=create, size=size, track=False)
    except TypeError:
        pass
    from multiprocessing import resource_tracker
    with _track_lock:
        register = resource_tracker.register
        resource_tracker.register = lambda *a, **k: None
        try:
            return shared_memory.SharedMemory(name=name, create=create, size=size)
        finally:
            resource_tracker.register = register


class Arena:
    """One process's attachment to the arena segment `name`."""

    def __init__(self, shm, lay, owner):
        self.shm = shm
        self.name = shm.name
        self.lay = lay
        self.mmap = shm._mmap
        self.fd = shm._fd
        self.mv = shm.buf
        self.q = self.mv.cast("Q")
        self.owner = owner          # True in the process that created it (unlinks on destroy)
        self.pid = os.getpid()
        self.repairs = 0            # dead actors' operations this process rolled back
        self._views = []            # memoryviews handed to caches; released at close
        self.locks = Locks(self)
        self.heap = PageHeap(self)
        self.central = CentralList(self)
        self.daemon_actor = lay.nslots  # slot index whose undo log the daemon (or a tool) uses
        # Registry operations (claim/free a slot) log here: the claimer has no slot yet, and the
        # registry lock -- the only lock they take -- serialises every user of this log.
        self.registry_actor = lay.nslots + 1
        self.closed = False

    # --- life cycle --------------------------------------------------------------------
    @classmethod
    def create(cls, name, heap_max, nslots=64):
        lay = L.Layout(heap_max, nslots)
        shm = _open_segment(name, True, lay.total_bytes)
        try:
            arena = cls(shm, lay, owner=True)
            lay.write_header(arena.q, time.time_ns())
        except BaseException:
            shm.close()
            shm.unlink()
            raise
        return arena

    @classmethod
    def attach(cls, name):
        shm = _open_segment(name, False)
        try:
            q = shm.buf.cast("Q")
            try:
                lay = L.Layout.from_header(q, shm.size)
            finally:
                q.release()
        except BaseException:
            shm.close()
            raise
        return cls(shm, lay, owner=False)

    def view(self, start, stop):
        v = self.mv[start:stop]
        self._views.append(v)
        return v

    def close(self):
        """Unmap in this process.  The segment itself lives on (see unlink)."""
        if self.closed:
            return
        self.closed = True
        for v in self._views:
            v.release()
        self._views.clear()
        self.q.release()
        try:
            self.shm.close()
        except BufferError:
            # A user still holds a Block view: the mapping lives until that view dies.
            os.close(self.shm._fd)
            self.shm._fd = -1

    def unlink(self):
        """Remove the segment name from /dev/shm (everyone's mappings stay valid)."""
        unlink_segment(self.name)

    def destroy(self):
        self.close()
        self.unlink()

    def check_open(self):
        if self.closed:
            raise ArenaClosed(f"arena {self.name} is closed in this process")

    # --- operations (locks.py) -----------------------------------------------------------
    def run(self, actor, fn):
        """Run fn(op) as one crash-safe operation of `actor`; retried after repairs."""
        self.check_open()
        while True:
            op = Op(self, actor)
            try:
                res = fn(op)
            except Retry:
                op.abort()
                continue
            except BaseException:
                op.abort()
                raise
            op.commit()
            return res

    # --- P slots ------------------------------------------------------------------------
    def slot_word(self, k):
        return self.lay.slot_word(k)

    def slot_byte(self, k):
        """File byte locked by the live owner of slot k for its whole life."""
        return self.lay.slots_off + k

    def claim_slot(self):
        """Become a P: take a free slot, lock its liveness byte.  Returns the slot index."""
        pid = os.getpid()

        def claim(op):
            op.acquire(L.LOCK_REGISTRY)
            q = self.q
            for k in range(self.lay.nslots):
                sw = self.slot_word(k)
                if q[sw + SL["state"]] != L.SLOT_FREE:
                    continue
                if not ofd_trylock(self.fd, self.slot_byte(k)):
                    continue  # freed but its old owner's lock is still draining
                if any(q[sw + L.SLOT_CACHED_AT + c] for c in range(L.NCLASS)) or q[sw + SL["log_used"]]:
                    ofd_unlock(self.fd, self.slot_byte(k))
                    raise CorruptionError(f"slot {k} is FREE but still caches spans or holds an undo log")
                op.w(sw + SL["state"], L.SLOT_ACTIVE)
                op.w(sw + SL["pid"], pid)
                op.add(sw + SL["gen"], 1)
                op.w(sw + SL["claimed_ns"], time.time_ns())
                op.w(sw + SL["heartbeat_ns"], time.time_ns())
                op.w(sw + SL["parked"], 0)
                # Claimed while the world is stopped: start stopped, so the new P's first call
                # waits for the resume (the daemon lifts every stop of its epoch).
                stopped = q[L.HDR["stopped_epoch"]]
                op.w(sw + SL["stop_epoch"], stopped)
                op.w(sw + SL["stop"], 1 if stopped else 0)
                return k
            raise NoFreeSlot(f"all {self.lay.nslots} P slots of arena {self.name} are taken")

        return self.run(self.registry_actor, claim)

    def release_slot(self, k):
        """Give slot k back: its cache must already be empty."""
        def free(op):
            op.acquire(L.LOCK_REGISTRY)
            sw = self.slot_word(k)
            for c in range(L.NCLASS):
                if self.q[sw + L.SLOT_CACHED_AT + c]:
                    raise CorruptionError(f"release of slot {k} that still caches a span of class {c}")
            op.w(sw + SL["state"], L.SLOT_FREE)
            op.w(sw + SL["pid"], 0)
        self.run(self.registry_actor, free)
        try:
            ofd_unlock(self.fd, self.slot_byte(k))
        except OSError:
            pass

    def slot_state(self, k):
        return self.q[self.slot_word(k) + SL["state"]]

    def slot_pid(self, k):
        return self.q[self.slot_word(k) + SL["pid"]]

    def slot_alive(self, k):
        """An ACTIVE slot is alive while its owner holds the liveness lock and its pid exists
        (a forked child can keep the lock's file description open after its parent died)."""
        if self.slot_state(k) != L.SLOT_ACTIVE:
            return False
        if not ofd_held_elsewhere(self.fd, self.slot_byte(k)):
            return False
        pid = self.slot_pid(k)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def active_slots(self):
        return [k for k in range(self.lay.nslots) if self.slot_state(k) == L.SLOT_ACTIVE]

    def cached_spans(self, k):
        """[(class, span record)] of the spans P k caches."""
        at = self.slot_word(k) + L.SLOT_CACHED_AT
        return [(c, v - 1) for c, v in enumerate(self.q[at:at + L.NCLASS].tolist()) if v and c]

    def release_all(self, k, actor=None):
        """Flush P k's cache to the central lists (Go: mcache.releaseAll).  Precondition: P k
        is parked, dead, or is the caller itself (actor == k).  Returns (spans, listed objects
        uncounted)."""
        return self.flush_slots([k], actor)[k]

    def flush_slots(self, slots, actor=None, keep_empty=False):
        """Flush the caches of `slots` in ONE operation (Go: flushallmcaches): every central
        lock involved is taken once, in order, then each span is uncached and the undo log
        checkpointed -- the state between two spans is a consistent one, so a crash rolls back
        at most the span in flight.  Each P is first told (flush_gen, and its stop byte if
        it is not the caller) to drop its local lists when it next runs, before any of its
        spans leaves its cache.  Returns {slot: (spans, listed objects uncounted)}."""
        actor = self.daemon_actor if actor is None else actor
        work = sorted((c, k, r) for k in slots for c, r in self.cached_spans(k))
        for k in slots:
            sw = self.slot_word(k)
            self.q[sw + SL["flush_gen"]] += 1
            if actor != k and self.q[sw + SL["stop"]] == 0:
                self.q[sw + SL["stop"]] = 2  # "resync": the P drops its lists on its next call
        out = {k: [0, 0] for k in slots}

        def flush(op):
            for c in sorted({c for c, _, _ in work}):
                op.acquire(L.LOCK_CENTRAL(c))
            if work:
                op.acquire(L.LOCK_HEAP)  # an emptied span goes back to the heap
            for c, k, r in work:
                if self.q[self.slot_word(k) + L.SLOT_CACHED_AT + c] - 1 != r:
                    continue  # a retry after a repair: already done
                out[k][0] += 1
                out[k][1] += self.central.uncache_span(op, c, r, k, keep_empty)
                op.log.clear()  # checkpoint
        if work:
            self.run(actor, flush)
        return {k: tuple(v) for k, v in out.items()}

    def free_empty_spans(self, actor=None):
        """Give the heap back every empty span waiting on a partial list.  Returns how many."""
        q, lay = self.q, self.lay
        classes = [c for c in range(1, L.NCLASS) if q[lay.central_word(c) + C["partial"]]]

        def free(op):
            for c in classes:
                op.acquire(L.LOCK_CENTRAL(c))
            op.acquire(L.LOCK_HEAP)
            n = 0
            for c in classes:
                n += self.central.free_empty(op, c)
                op.log.clear()  # checkpoint: each class leaves a consistent state
            return n
        return self.run(self.daemon_actor if actor is None else actor, free) if classes else 0

    def reclaim(self, k, actor=None):
        """Reclaim the slot of dead P k: roll back its half-done operation, flush its cache,
        free the slot.  Blocks it allocated stay allocated."""
        if self.slot_alive(k):
            raise CorruptionError(f"reclaim of live P {k} (pid {self.slot_pid(k)})")
        self.locks.repair(k)
        self.release_all(k, actor)
        sw = self.slot_word(k)

        def free(op):
            op.acquire(L.LOCK_REGISTRY)
            op.w(sw + SL["state"], L.SLOT_FREE)
            op.w(sw + SL["pid"], 0)
            op.w(sw + SL["stop"], 0)
        self.run(self.registry_actor, free)

    def reclaim_dead(self, actor=None):
        dead = [k for k in self.active_slots() if not self.slot_alive(k)]
        for k in dead:
            self.reclaim(k, actor)
        return dead

    # --- large objects (> 32 KiB): a span each, straight from the page heap -------------------
    def alloc_large(self, op, size):
        npages = (size + PAGE - 1) // PAGE
        op.acquire(L.LOCK_HEAP)
        r = self.heap.alloc_span(op, npages, 0, 1)
        start = self.q[self.lay.span_word(r) + S["start"]]
        h = self.lay.heap_off + start * PAGE
        op.wbyte(self.lay.amap_off + start * PAGE // 8, L.ALLOC)
        hw = self.lay.heap_word()
        op.add(hw + H["large_mallocs"], 1)
        op.add(hw + H["large_live"], 1)
        op.add(hw + H["large_live_pages"], npages)
        op.add(hw + H["large_total_bytes"], npages * PAGE)
        return h, npages * PAGE

    def free_large(self, op, r, h):
        op.need(L.LOCK_HEAP, "Arena.free_large")
        w = self.lay.span_word(r)
        q = self.q
        base = self.lay.heap_off + q[w + S["start"]] * PAGE
        if h != base:
            raise BadHandle(f"handle {h} is inside a large block of {q[w + S['npages']] * PAGE} bytes "
                            f"but not at its start ({base})")
        boff = self.lay.amap_off + (h - self.lay.heap_off) // 8
        if self.mv[boff] != L.ALLOC:
            raise DoubleFree(f"double free: large block {h} is already free")
        npages = q[w + S["npages"]]
        op.wbyte(boff, L.FREE)
        hw = self.lay.heap_word()
        op.add(hw + H["large_live"], -1)
        op.add(hw + H["large_live_pages"], -npages)
        self.heap.free_span(op, r)

    # --- any process's free of any handle (the slow path) ---------------------------------------
    def check_handle(self, h):
        """(page) of a handle that could be an object start; BadHandle otherwise."""
        if h.__class__ is not int:
            try:
                h = h.__index__()
            except AttributeError:
                raise BadHandle(f"a handle is an int, got {type(h).__name__}") from None
        lay = self.lay
        d = h - lay.heap_off
        if not 0 <= d < lay.heap_max:
            raise BadHandle(f"handle {h} is out of range: the heap spans "
                            f"[{lay.heap_off}, {lay.heap_off + lay.heap_max})")
        if d & 7:
            raise BadHandle(f"handle {h} is not 8-byte aligned, so it is no object start")
        return h, d >> L.PAGE_SHIFT

    def free(self, h, actor):
        """Free handle h on behalf of `actor` (a P slot, or the daemon's).  The fast path of
        ProcessCache handles its own cached spans; everything else comes here."""
        h, page = self.check_handle(h)

        def op_free(op):
            r = self.heap.span_of_page(page)
            if r < 0:
                raise BadHandle(f"handle {h} is not a live block: no span holds it (never allocated, "
                                "or freed and its span returned to the heap)")
            c = self.q[self.lay.span_word(r) + S["sizeclass"]]
            op.acquire(L.LOCK_HEAP if c == 0 else L.LOCK_CENTRAL(c))
            r2 = self.heap.span_of_page(page)
            if r2 != r or self.q[self.lay.span_word(r) + S["sizeclass"]] != c:
                raise Retry()  # the span changed before we got its lock
            if c == 0:
                self.free_large(op, r, h)
            else:
                self.central.free_object(op, c, r, h, actor)

        self.run(actor, op_free)

    def block_capacity(self, h):
        """Usable bytes of the live object at handle h (no lock: a read of stable fields)."""
        h, page = self.check_handle(h)
        r = self.heap.span_of_page(page)
        b = self.mv[self.lay.amap_off + (h - self.lay.heap_off) // 8]
        if r < 0 or not (b == L.ALLOC or b >= L.TAG0):
            raise BadHandle(f"handle {h} is not a live block (already freed, or never allocated)")
        w = self.lay.span_word(r)
        c = self.q[w + S["sizeclass"]]
        if c == 0:
            return self.q[w + S["npages"]] * PAGE
        size = CLASS_TO_SIZE[c]
        if (h - (self.lay.heap_off + self.q[w + S["start"]] * PAGE)) % size:
            raise BadHandle(f"handle {h} is not at the start of a block")
        return size

    # --- heap maintenance ---------------------------------------------------------------
    def release_free_pages(self, actor=None):
        def rel(op):
            op.acquire(L.LOCK_HEAP)
            return self.heap.release_free(op)
        return self.run(self.daemon_actor if actor is None else actor, rel)

    # --- statistics (stats.py) ------------------------------------------------------------
    def flush_all(self, parked=(), actor=None, keep_empty=False):
        """Flush every cache that may be flushed: the `parked` Ps and every dead one."""
        for k in self.active_slots():
            if k not in parked and not self.slot_alive(k):
                self.reclaim(k, actor)
        return self.flush_slots([k for k in self.active_slots() if k in parked], actor, keep_empty)

    def update_stats(self, parked=(), actor=None):
        """Go's updatememstats: flush every cache FIRST, then read the figures.  Reading before
        flushing is the bug of golang/go#38712 (tests/test_arena.py builds it on purpose)."""
        self.flush_all(parked, actor)
        return _stats.read_stats(self)

    def read_stats(self):
        return _stats.read_stats(self)

    def read_stats_slow(self):
        return _stats.read_stats_slow(self)

    def check(self):
        """Verify every structure and identity; raise CorruptionError naming what is broken."""
        problems = _stats.check(self)
        if problems:
            raise CorruptionError("arena check failed: " + "; ".join(problems[:20])
                                  + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))
