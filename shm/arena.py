"""Arena: the segment, attached in one process.  See shm/__init__.py for an overview.

`Arena.create` (the daemon, or a test) reserves the segment and writes the header;
`Arena.attach` (a worker) maps it and refuses anything whose magic, version or sizes disagree.
The arena ties the pieces together: locks (locks.py), page heap (heap.py), central lists
(central.py), large objects (large.py), the P-slot registry (registry.py); each P's cache
(cache.py) is flushed here, by the P itself or, while it is stopped or dead, by the daemon
(world.py); statistics are in stats.py.  Arena.check_all runs every structure's own check.

One module although it is over 400 lines: what is left here is what spans several structures at
once -- flushing a P (central lists, large objects, its remote-free buffer, under several locks
in one operation), reclaiming a dead P, any process's free -- and each piece needs the others.
"""

import ctypes
import logging
import mmap
import os
import platform
import threading
import time
import weakref
from bisect import bisect_left, bisect_right
from itertools import compress
from multiprocessing import shared_memory

from . import layout as L
from . import stats as _stats
from .central import CentralList
from .errors import ArenaClosed, BadHandle, CorruptionError, DoubleFree
from .heap import PageHeap, reserve
from .large import LargeObjects
from .locks import Locks, Op, Retry
from .registry import Registry
from .sizeclasses import CLASS_TO_ALLOCNPAGES, CLASS_TO_SIZE

_log = logging.getLogger("shmalloc.arena")

S = L.SPAN
H = L.HEAP
C = L.CENTRAL
SL = L.SLOT
PAGE = L.PAGE_SIZE
_SMALL_SPAN_PAGES = max(CLASS_TO_ALLOCNPAGES)  # the longest small span, in pages
LARGE_GROUP = (0, -1)  # Arena._buffer_groups' key of the buffered frees of large blocks
LARGE_KEPT = (0, -2)  # apply_buffered_frees' key of the large frees it keeps for their owners
LARGE_STEP = 8  # buffered frees of large blocks applied in one checkpointed step, at most


def _merged(ranges):
    """(offset, bytes) ranges as sorted, disjoint [start, end) runs of whole OS pages (what
    posix_fallocate reserves for them)."""
    runs = []
    for off, n in sorted(ranges):
        lo, hi = off // L.OS_PAGE * L.OS_PAGE, -(-(off + n) // L.OS_PAGE) * L.OS_PAGE
        if runs and lo <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], hi)
        else:
            runs.append([lo, hi])
    return [tuple(r) for r in runs]


def _minus(start, end, runs):
    """The parts of [start, end) outside the sorted disjoint `runs`."""
    out = []
    for lo, hi in runs:
        if hi <= start or lo >= end:
            continue
        if lo > start:
            out.append((start, lo))
        start = max(start, hi)
    if start < end:
        out.append((start, end))
    return out


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


# --- fork ---------------------------------------------------------------------------------------
# A forked child inherits the parent's descriptor of the segment, the descriptor Python's mmap
# object dup()s for itself, and the mapping, whose vma holds the same struct file: three
# references to the parent's open file description, which owns the parent's OFD locks.  Were the
# child to keep them, a parent killed inside a critical section would leave its lock held for as
# long as the child lives, and the arena would freeze.  So the child takes a description of its
# own: it reopens the segment, dup2()s the fresh descriptor over every inherited one that refers
# to the parent's description, and maps the fresh one over the whole mapping at the same address
# (MAP_FIXED), so every memoryview it inherited stays valid and sees the same shared pages.
_NR_KCMP = {"x86_64": 312, "aarch64": 272, "arm64": 272}.get(platform.machine())
_KCMP_FILE = 0
_MAP_FIXED = 0x10
_OPEN: "weakref.WeakSet[Arena]" = weakref.WeakSet()  # every Arena open in this process
_libc = None


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.mmap.restype = ctypes.c_void_p
        _libc.mmap.argtypes = (
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_long,
        )
    return _libc


def _same_description(fd, candidate):
    """Does `candidate` refer to the open file description of `fd`?  kcmp(2) says exactly; where
    it is missing (None) the caller decides from the inode alone."""
    if _NR_KCMP is None:
        return None
    pid = os.getpid()
    r = _c().syscall(_NR_KCMP, pid, pid, _KCMP_FILE, fd, candidate)
    return None if r < 0 else r == 0


def _inherited_descriptors(fd, others):
    """Descriptor numbers of this process that refer to the description of `fd`: `fd` itself and
    the mmap object's internal dup.  Without kcmp, every descriptor of the same file that is not
    another open Arena's own."""
    st = os.fstat(fd)
    out = []
    for name in os.listdir("/proc/self/fd"):
        n = int(name)
        try:
            s = os.fstat(n)
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if (s.st_dev, s.st_ino) != (st.st_dev, st.st_ino):
            continue
        same = _same_description(fd, n)
        if same or (same is None and (n == fd or n not in others)):
            out.append(n)
    return out


def _after_fork_in_child():
    arenas = [a for a in list(_OPEN) if not a.closed]
    others = {a.fd for a in arenas}
    for arena in arenas:
        try:
            arena._own_description(others)
        except OSError as e:
            _log.warning(
                "arena %s: a forked child could not take a description of its own (%s); a crash of "
                "its parent inside a lock leaves that lock held until this child exits",
                arena.name,
                e,
            )


os.register_at_fork(after_in_child=_after_fork_in_child)


class Arena:
    """One process's attachment to the arena segment `name`."""

    def __init__(self, shm, lay):
        self.shm = shm
        self.name = shm.name
        self.lay = lay
        self.mmap = shm._mmap
        self.fd = shm._fd
        self.mv = shm.buf
        self.q = self.mv.cast("Q")
        # Where the mapping starts (a fork remaps it there: _own_description).
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.mmap))
        self._length = len(self.mmap)
        self.pid = os.getpid()
        self.repairs = 0  # dead actors' operations this process rolled back
        self._views = []  # memoryviews handed to caches; released at close
        self.locks = Locks(self)
        self.heap = PageHeap(self)
        self.central = CentralList(self)
        self.large = LargeObjects(self)
        self.registry = Registry(self)
        self.daemon_actor = lay.nslots  # slot index whose undo log the daemon (or a tool) uses
        # Registry operations (claim/free a slot) log here: the claimer has no slot yet, and the
        # registry lock -- the only lock they take -- serialises every user of this log.
        self.registry_actor = lay.nslots + 1
        self.closed = False
        _OPEN.add(self)

    # --- life cycle --------------------------------------------------------------------
    @classmethod
    def create(cls, name, heap_max, nslots=64):
        lay = L.Layout(heap_max, nslots)
        shm = _open_segment(name, True, lay.total_bytes)
        try:
            # The heap's pages and their table entries are reserved as they are committed, the
            # span records as they come into use (PageHeap), a worker's slot at its first claim
            # (Registry.claim); the fixed regions, now.  A full /dev/shm fails here, not later.
            fixed = lay.fixed_ranges()
            reserve(
                shm._fd,
                fixed,
                f"the arena's {sum(n for _, n in fixed)} bytes of fixed regions",
                f"give /dev/shm more room (the {nslots} worker slots, {lay.slot_words * L.WORD >> 10} KiB "
                "each with its undo log, are reserved as workers first claim them, not now)",
            )
            arena = cls(shm, lay)
            lay.write_header(arena.q, time.time_ns())
        except BaseException:
            shm.close()
            unlink_segment(name)  # not shm.unlink(): the resource tracker never had it
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
        return cls(shm, lay)

    @property
    def arena_id(self):
        """The arena's identity: 64 random bits drawn when it was created (layout.HDR); still
        known after close(), so that a Block of a closed arena is told from one of another."""
        return self._arena_id if self.closed else self.q[L.HDR["arena_id"]]

    _arena_id = 0  # the identity, kept at close()

    def view(self, start, stop):
        """Bytes [start, stop) of the segment, released when the arena closes."""
        v = self.mv[start:stop]
        self._views.append(v)
        return v

    def words(self, first, n):
        """Words [first, first + n) of the segment (a 'Q' view), released when the arena closes."""
        v = self.q[first : first + n]
        self._views.append(v)
        return v

    def close(self):
        """Unmap in this process.  The segment itself lives on (see unlink)."""
        if self.closed:
            return
        self._arena_id = self.q[L.HDR["arena_id"]]
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

    def _own_description(self, others=()):
        """In a forked child: drop every reference to the parent's open file description (see
        `_after_fork_in_child`).  The descriptor numbers, the mapping's address and its contents
        stay what they were; only the description behind them is this process's own."""
        fresh = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)  # a new description
        try:
            targets = _inherited_descriptors(self.fd, others)
            libc = _c()
            got = libc.mmap(
                self._base,
                self._length,
                mmap.PROT_READ | mmap.PROT_WRITE,
                mmap.MAP_SHARED | _MAP_FIXED,
                fresh,
                0,
            )
            if got != self._base:
                e = ctypes.get_errno()
                raise OSError(e, f"mmap(MAP_FIXED) over the inherited mapping: {os.strerror(e)}")
            for n in targets:
                os.dup2(fresh, n, inheritable=False)
        finally:
            os.close(fresh)
        self.locks.after_fork()

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
    def run(self, actor, fn, gate=None):
        """Run fn(op) as one crash-safe operation of `actor`; retried after repairs.  `gate`:
        the operation is the first of P `actor`'s call, which may start again (Op.acquire)."""
        self.check_open()
        while True:
            op = Op(self, actor, gate)
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

    # --- P caches (registry.py holds the slot table) ------------------------------------------
    def cached_spans(self, k):
        """[(class, span record)] of the small spans P k caches."""
        at = self.lay.slot_word(k) + L.SLOT_CACHED_AT
        v = self.q[at : at + L.NCLASS]
        return [(c, v[c] - 1) for c in compress(range(1, L.NCLASS), v[1:])]

    def buffered_frees(self, k):
        """The handles in P k's remote-free buffer, not yet applied (0 = applied already)."""
        sw = self.lay.slot_word(k)
        n = self.q[sw + SL["rfree_n"]]
        return self.q[sw + L.SLOT_RFREE_AT : sw + L.SLOT_RFREE_AT + n].tolist()

    def flushed_clean(self, k):
        """Has P k made no allocator call since its cache was last flushed?  Then that flush left
        its cache as a flush leaves it (no small span, no buffered free, no large span LISTED,
        nothing to fold), and flushing it again would change nothing: every call after a flush
        first drops the P's local lists, and says so (slot synced_gen) before it does anything
        else.  Exact when P k is stopped; a hint otherwise."""
        sw = self.lay.slot_word(k)
        return self.q[sw + SL["synced_gen"]] != self.q[sw + SL["flush_gen"]]

    def flush_cache(self, k, actor=None):
        """Flush P k's cache (Go: mcache.releaseAll).  Precondition: P k is stopped, dead, or is
        the caller itself (actor == k).  Returns (spans, listed objects uncounted)."""
        return self.flush_slots([k], actor)[k]

    def flush_slots(self, slots, actor=None, keep_empty=False, disown=True):
        """Flush the caches of `slots` in ONE operation (Go: flushallmcaches): every P's buffered
        remote frees are applied, then every small span it caches is uncached and every large
        span it owns settled (large.py: `disown` for a P that leaves).  The frees buffered in a
        span one of these Ps caches are applied by that span's uncache, in the same retag.  Each
        central lock involved is taken once, in order, then the heap lock; the undo log is
        checkpointed after each span -- the state between two spans is a consistent one, so a
        crash rolls back at most the span in flight.  Each P is first told (flush_gen, and its
        stop byte if it is running) to drop its local lists at its next call, before any of its
        spans leaves its cache.  Returns {slot: (spans, listed objects uncounted)}."""
        actor = self.daemon_actor if actor is None else actor
        work = sorted((c, k, r) for k in slots for c, r in self.cached_spans(k))
        at = {r: (i, c, k) for i, (c, k, r) in enumerate(work)}
        buffers = {k: self._buffer_groups(k) for k in slots}
        q, lay = self.q, self.lay
        classes = {c for c, _, _ in work}
        for groups in buffers.values():
            classes |= {c for c, _ in groups}
        out = {k: [0, 0] for k in slots}
        nbad = dict.fromkeys(slots, 0)
        bad_w = lay.heap_word() + H["bad_frees"]

        def cached(c, k, r):
            return q[lay.slot_word(k) + L.SLOT_CACHED_AT + c] - 1 == r

        def flush(op):
            for c in sorted(classes - {0}):
                op.acquire(L.LOCK_CENTRAL(c))
            op.acquire(L.LOCK_HEAP)  # large spans, and emptied small spans go back to the heap
            # Told only once every lock is held (a flush that cannot take one changes nothing),
            # and logged, so that a rolled-back flush does not make the P drop its lists.
            gens = [lay.slot_word(k) + SL["flush_gen"] for k in slots]
            op.wset(gens, [q[g] + 1 for g in gens])
            for k in slots:
                sw = lay.slot_word(k)
                if actor != k and q[sw + SL["stop"]] == L.STOP_RUN:
                    q[sw + SL["stop"]] = L.STOP_RESYNC
            # The frees buffered in a span that one of these Ps caches are applied by that span's
            # uncache below (`folded`: record -> [(P, handles)]), the others first.  A cached
            # span is in use, of its class; the uncache judges each handle against it.
            folded, left = {}, {}
            for k in slots:
                keep = sorted(
                    (at[r][0], (c, r))
                    for (c, r), hs in buffers[k].items()
                    if r in at and at[r][1] == c and cached(*at[r][1:], r)
                )
                nbad[k] = self._apply_buffer(op, k, buffers[k], [key for _, key in keep])
                left[k] = 0
                for _, (c, r) in keep:
                    folded.setdefault(r, []).append((k, buffers[k][c, r]))
                    left[k] += len(buffers[k][c, r])
            uncache, log = self.central.uncache_span, op.log
            for c, k, r in work:
                if not cached(c, k, r):
                    continue  # a retry after a repair: already done
                frees = folded.pop(r, None)
                if frees is None:
                    listed, _ = uncache(op, c, r, k, keep_empty, remember=not disown)
                else:
                    # Each buffer's count drops below the frees applied here in the same step.
                    for j, hs in frees:
                        left[j] -= len(hs)
                    idxs = [lay.slot_word(j) + SL["rfree_n"] for j, _ in frees]
                    listed, bads = uncache(
                        op,
                        c,
                        r,
                        k,
                        keep_empty,
                        [hs for _, hs in frees],
                        idxs,
                        [left[j] for j, _ in frees],
                        remember=not disown,
                    )
                    if any(bads):
                        op.add(bad_w, sum(bads))
                        for (j, _), bad in zip(frees, bads):
                            nbad[j] += bad
                o = out[k]
                o[0] += 1
                o[1] += listed
                log.clear()  # checkpoint
            if folded:
                raise CorruptionError(
                    f"buffered frees in spans {sorted(folded)} were kept for an uncache that did not come"
                )
            for k in slots:
                out[k][0] += self.large.flush(op, k, disown)

        self.run(actor, flush)
        for k, n in nbad.items():
            self._warn_bad(k, n)
        return {k: tuple(v) for k, v in out.items()}

    def apply_buffered_frees(self, k, actor=None, gate=None, keep=0, keep_pages=0, old=0):
        """P k applies its own remote-free buffer (it is full, or the P is closing).  `gate`:
        as for run().  `keep`, `keep_pages`: the frees of large blocks that another P owns and
        may still take back (LargeObjects.waiting) stay in the buffer, at its start, when they
        are no more than that many and pages -- but for those among its first `old` entries,
        which the apply before kept: none is kept twice.  The owner takes each back when it
        next wants one; applied, each would move to its pending list, a list move logged under
        the heap lock, where keeping it costs a word.  Returns the number of frees found bad."""
        groups = self._buffer_groups(k)
        n_w = self.lay.slot_word(k) + SL["rfree_n"]
        if not groups and not self.q[n_w]:
            return 0

        def apply(op):
            for c in sorted({c for c, _ in groups} - {0}):
                op.acquire(L.LOCK_CENTRAL(c))
            op.acquire(L.LOCK_HEAP)
            if not keep or LARGE_GROUP not in groups:
                return self._apply_buffer(op, k, groups)
            now = self.buffered_frees(k)
            there = set(now[old:]) - set(now[:old])
            kept = self.large.waiting(op, k, [h for h in groups[LARGE_GROUP] if h in there])
            if not kept or len(kept) > keep or sum(n for _, n, _ in kept) > keep_pages:
                return self._apply_buffer(op, k, groups)
            mine = {h for h, _, _ in kept}
            rest = [h for h in groups[LARGE_GROUP] if h not in mine]
            split = {key: hs for key, hs in groups.items() if key != LARGE_GROUP}
            if rest:
                split[LARGE_GROUP] = rest
            split[LARGE_KEPT] = sorted(mine)
            for j in {j for _, _, j in kept}:
                # A hint (unlogged: one left set by a rolled-back step costs a look): each owner
                # looks at its next large slow path, as after a free of its block.
                self.q[self.lay.slot_word(j) + SL["lg_rhint"]] = 1
            return self._apply_buffer(op, k, split, (LARGE_KEPT,))

        nbad = self.run(k if actor is None else actor, apply, gate)
        self._warn_bad(k, nbad)
        return nbad

    def _buffer_groups(self, k):
        """P k's buffered frees grouped by the span that holds them, read without a lock:
        {(class, record): [handle, ...] ascending}; class -1 for handles no span holds, and one
        group LARGE_GROUP for every handle on a large span's page (_apply_buffer looks each up
        under the heap lock, LARGE_STEP of them a step).  The
        handles are sorted, then taken a span at a time -- the span the page map names for the
        first handle's page, when its every page from there on names it too (one read of its
        page-map words, where a page at a time cost a read and a bisection per page: a 4 KiB
        class's span has 16) -- else a page at a time.  A live object's page names its span, which
        stays in use while the object is buffered, so a good handle is grouped with its span
        whatever the unlocked reads meet.  _apply_buffer re-checks every group under the locks."""
        q, lay = self.q, self.lay
        sw = lay.slot_word(k)
        hs = sorted(q[sw + L.SLOT_RFREE_AT : sw + L.SLOT_RFREE_AT + q[sw + SL["rfree_n"]]].tolist())
        pm, npages, sw0 = lay.pagemap_word(), lay.heap_max >> L.PAGE_SHIFT, lay.span_word(0)
        groups, sc, start, np_, shift = {}, S["sizeclass"], S["start"], S["npages"], L.PAGE_SHIFT
        first_coarse, page_of = lay.handle_c0 << L.GEN_BITS, lay.handle_page
        top = q[lay.heap_word() + H["committed_pages"]]  # page-map words past it may be unreserved
        i, n = bisect_right(hs, 0), len(hs)  # 0: applied by an earlier, interrupted pass (no handle is 0)
        while i < n:
            page = page_of(hs[i])
            r = q[pm + page] - 1 if 0 <= page < npages else -1
            end = page + 1
            if r >= 0:
                w = sw0 + r * L.SPAN_WORDS
                key = (q[w + sc], r)
                if key[0] == 0:
                    key = LARGE_GROUP  # large blocks: one group, each found under the heap lock
                else:
                    e = q[w + start] + q[w + np_]  # the span's end, if the record is the page's span
                    # Taken whole when every later page of it names it too (a small span's all do).
                    rest = e - end if end < e <= min(page + _SMALL_SPAN_PAGES, top) else 0
                    if rest and q[pm + end : pm + e].tolist() == [r + 1] * rest:
                        end = e
            else:
                key = (-1, -1)
            # The first handle past the span (or page) in the same part of the maps (class 1 is
            # fine, class 0 -- large -- coarse): every coarse handle sorts after every fine one.
            nxt = lay.make_handle(end << shift, 0, 0 if hs[i] >= first_coarse else 1)
            j = bisect_left(hs, nxt, i + 1)
            g = groups.get(key)
            if g is None:
                groups[key] = hs[i:j]
            else:
                g += hs[i:j]
            i = j
        return groups

    def _apply_buffer(self, op, k, groups, keep=()):
        """Apply P k's buffered remote frees, one span at a time (one retag per span), but for the
        groups `keep` (keys of `groups`, in the order the caller applies them later).  The buffer
        is first rewritten in group order: the groups kept at its start, the first to apply at
        their end; then the others, ascending, applied from the last.  After each group
        the buffer's count (rfree_n) drops below that group's entries in the same checkpointed
        step, so a retry after a crash never applies one twice (one word written per group): it
        ends at the kept groups' count.  Frees found bad now are counted (heap bad_frees, in the
        same step) and returned, never applied.  The frees of large blocks (LARGE_GROUP) go
        LARGE_STEP a step, the count dropping below each step's in it; those whose owner took
        them back since `groups` was read (their entries 0) are dropped with the 0s.  Caller holds
        the heap lock and the central locks of the classes in `groups`."""
        lay = self.lay
        sw = lay.slot_word(k)
        n_w, bad_w = sw + SL["rfree_n"], lay.heap_word() + H["bad_frees"]
        if LARGE_GROUP in groups:
            # Their owners may have taken some back since the groups were read (take_back, under
            # the heap lock we hold now): those entries are 0 in the buffer.
            now = set(self.q[sw + L.SLOT_RFREE_AT : sw + L.SLOT_RFREE_AT + self.q[n_w]].tolist())
            large = [h for h in groups[LARGE_GROUP] if h in now]
            groups = (
                {**groups, LARGE_GROUP: large}
                if large
                else {key: hs for key, hs in groups.items() if key != LARGE_GROUP}
            )
        if not groups:  # nothing left to apply: every entry 0 (taken back, or applied)
            op.w(n_w, 0)
            return 0
        order = sorted((hs[0], key) for key, hs in groups.items() if key not in keep)
        flat = []
        for key in (*reversed(keep), *(key for _, key in order)):
            flat += groups[key]
        left = len(flat)
        at = sw + L.SLOT_RFREE_AT
        if self.q[at : at + self.q[n_w]].tolist() != flat:
            op.wwords(at, flat)
        op.w(n_w, left)
        op.log.clear()  # checkpoint: the same frees, the first group to apply at the end
        nbad = 0
        for _, (c, r) in reversed(order):
            handles = groups[c, r]
            large = (c, r) == LARGE_GROUP
            # Large blocks LARGE_STEP a step, from the group's end: the undo log stays bounded (a
            # large free may give its span back to the heap), and a crash loses that step only.
            steps = range(len(handles), 0, -LARGE_STEP) if large else (len(handles),)
            for j in steps:
                part = handles[max(0, j - LARGE_STEP) : j] if large else handles
                if large:
                    bad = self._free_large(op, k, part)
                elif r < 0 or not self._group_holds(r, c, part):
                    bad = len(part)  # no span holds them now: stale handles
                elif L.LOCK_CENTRAL(c) in op.held:
                    bad = self.central.apply_frees(op, c, r, part, k)
                else:
                    bad = len(part)
                left -= len(part)
                op.w(n_w, left)
                if bad:
                    op.add(bad_w, bad)
                    nbad += bad
                op.log.clear()  # checkpoint
        return nbad

    def _free_large(self, op, k, handles):
        """Apply P k's buffered frees `handles` of large blocks, each block found from its page
        under the heap lock (held).  Returns how many were bad (no large span starts there now, or
        its block is not the one the handle named), none of them applied."""
        q, lay, heap, bad = self.q, self.lay, self.heap, 0
        for h in handles:
            r = heap.span_of_page(lay.handle_page(h))
            if r < 0 or q[lay.span_word(r) + S["sizeclass"]] != 0:
                bad += 1
                continue
            try:
                self.large.free(op, r, h, k, buffered=True)
            except BadHandle:
                bad += 1
        return bad

    def _warn_bad(self, k, nbad):
        if nbad:
            _log.warning(
                "P %d: %d buffered free(s) found bad when applied (a double free across "
                "processes, or a stale handle); skipped, counted in bad_frees",
                k,
                nbad,
            )

    def _group_holds(self, r, c, handles):
        """Under the locks: span r is in use, of class c, and holds every handle of the group
        (ascending, as _buffer_groups makes them)."""
        q, w = self.q, self.lay.span_word(r)
        if q[w + S["state"]] != L.SPAN_INUSE or q[w + S["sizeclass"]] != c:
            return False
        lo = self.lay.make_handle(q[w + S["start"]] * PAGE, 0, c)
        hi = self.lay.make_handle((q[w + S["start"]] + q[w + S["npages"]]) * PAGE, 0, c)
        return lo <= handles[0] and handles[-1] < hi

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
        """Reclaim the slot of dead P k: roll back its half-done operation, flush its cache (its
        buffered frees applied), give its slot back.  Blocks it allocated stay allocated."""
        if self.registry.alive(k):
            raise CorruptionError(f"reclaim of live P {k} (pid {self.registry.pid(k)})")
        self.locks.repair(k)
        self.flush_cache(k, actor)
        self.registry.give_back(k)

    def reclaim_dead(self, actor=None):
        dead = [k for k in self.registry.active_slots() if not self.registry.alive(k)]
        for k in dead:
            self.reclaim(k, actor)
        return dead

    # --- any process's free of any handle (the slow path) ---------------------------------------
    def check_handle(self, h):
        """(handle, map index, generation) of a handle that names a byte of the maps; BadHandle
        otherwise (layout.py: what a handle is)."""
        if h.__class__ is not int:
            try:
                h = h.__index__()
            except AttributeError:
                raise BadHandle(f"a handle is an int, got {type(h).__name__}") from None
        j, gen = L.handle_index(h)
        if not 0 <= j < self.lay.amap_bytes:
            raise BadHandle(
                f"handle {h} is out of range: handles of this arena lie in "
                f"[{L.HANDLE_MIN}, {(L.HANDLE_G0 + self.lay.amap_bytes) << L.GEN_BITS})"
            )
        return h, j, gen

    def addr(self, h):
        """Byte offset in the segment of the memory of the block a handle names (no check:
        view() is the checked way in)."""
        return self.lay.heap_off + self.lay.handle_offset(h)

    def free(self, h, actor):
        """Free handle h on behalf of `actor` (a P slot, or the daemon's).  The fast path of
        ProcessCache handles its own cached spans; everything else comes here."""
        h, j, gen = self.check_handle(h)
        page, coarse = self.lay.index_page(j), j >= self.lay.fine_bytes

        def op_free(op):
            r = self.heap.span_of_page(page)
            c = self.q[self.lay.span_word(r) + S["sizeclass"]] if r >= 0 else -1
            if r < 0 or L.CLASS_COARSE[c] != coarse:  # no span holds it in h's part of the maps
                big = self._large_span_over(page) if r < 0 and coarse else -1
                if big >= 0:
                    self._double_free(h, j, gen, big)
                    raise BadHandle(
                        f"handle {h} is inside a large block of "
                        f"{self.q[self.lay.span_word(big) + S['npages']] * PAGE} bytes but not at its start"
                    )
                if r >= 0:
                    self._double_free(h, j, gen, r)
                    raise BadHandle(
                        f"handle {h} is stale: its block's pages now hold blocks of "
                        f"{CLASS_TO_SIZE[c] if c else self.q[self.lay.span_word(r) + S['npages']] * PAGE} bytes"
                    )
                self._double_free(h, j, gen)
                raise BadHandle(
                    f"handle {h} is not a live block: no span holds it (never allocated, "
                    "or freed and its span returned to the heap)"
                )
            op.acquire(L.LOCK_HEAP if c == 0 else L.LOCK_CENTRAL(c))
            r2 = self.heap.span_of_page(page)
            if r2 != r or self.q[self.lay.span_word(r) + S["sizeclass"]] != c:
                raise Retry()  # the span changed before we got its lock
            if not self._object_at(r, self.lay.index_offset(j))[0]:
                self._double_free(h, j, gen, r)  # else free_object or free says what it is
            if c == 0:
                self.large.free(op, r, h, actor)
            else:
                self.central.free_object(op, c, r, h, actor)

        self.run(actor, op_free)

    def _object_at(self, r, off):
        """(an object of in-use span r starts at heap byte offset `off`, the object of r over
        `off` is allocated), read in the span's own part of the maps.  A block freed whose free
        is still buffered (RFREED) counts as free."""
        q, lay, w = self.q, self.lay, self.lay.span_word(r)
        c, start = q[w + S["sizeclass"]], q[w + S["start"]]
        size, n = (CLASS_TO_SIZE[c], q[w + S["nelems"]]) if c else (q[w + S["npages"]] * PAGE, 1)
        j0, grain = lay.span_index(start, c)
        i, rem = divmod(off - start * PAGE, size)
        b = self.mv[lay.amap_off + j0 + i * (size // grain)] if 0 <= i < n else L.FREE
        return rem == 0 and 0 <= i < n, b == L.ALLOC or b >= L.TAG0

    def _double_free(self, h, j, gen, r=-1):
        """Raise DoubleFree if h is the last handle of its map byte, freed (the byte's generation
        is one past h's), and no allocated object of span r (-1: none holds the page) covers its
        address: freeing a handle twice is a double free whatever was made of its memory since,
        as long as nobody else holds it.  No lock needed: it only picks the error."""
        if r >= 0 and self._object_at(r, self.lay.index_offset(j))[1]:
            return
        if self._gen_readable(j) and self.mv[self.lay.gmap_off + j] == (gen + 1) & L.GEN_MASK:
            raise DoubleFree(f"double free: block {h} is already free (and its span went back to the heap)")

    def _gen_readable(self, j):
        """May map byte j be read though no span holds its page?  A coarse byte of the committed
        heap, or a fine byte the fine-map table says is reserved (else a read could fault a page
        in; a released page's coarse byte may fault one in too, as it always could: an error
        path only)."""
        lay = self.lay
        if j < lay.fine_bytes:
            return self.mv[lay.finemap_flags + j // L.OS_PAGE] == 1
        return lay.index_page(j) < self.q[lay.heap_word() + H["committed_pages"]]

    def _large_span_over(self, page):
        """The in-use large span whose interior holds `page`, or -1.  The page map names only a
        large span's first and last pages, so this walks back to its first: an error path only."""
        q, pm = self.q, self.lay.pagemap_word()
        committed = q[self.lay.heap_word() + H["committed_pages"]]
        for p in range(min(page, committed) - 1, -1, -1):  # entries past committed: unreserved
            r = q[pm + p] - 1
            if r >= 0:
                w = self.lay.span_word(r)
                start, n = q[w + S["start"]], q[w + S["npages"]]
                if p == start and q[w + S["state"]] == L.SPAN_INUSE and q[w + S["sizeclass"]] == 0:
                    return r if start <= page < start + n else -1
                if start <= p < start + n and q[w + S["state"]] in (L.SPAN_INUSE, L.SPAN_FREE):
                    return -1  # a valid span ends here, or a small one holds p: not inside a large one
        return -1

    def block_capacity(self, h):
        """Usable bytes of the live object at handle h (no lock: a read of stable fields)."""
        h, j, gen = self.check_handle(h)
        lay = self.lay
        r = self.heap.span_of_page(lay.index_page(j))
        w = lay.span_word(r)
        c = self.q[w + S["sizeclass"]] if r >= 0 else 0
        # The map byte is read only within an in-use span, in the part its class uses: elsewhere
        # it may not be reserved.
        if r >= 0 and (j >= lay.fine_bytes) != L.CLASS_COARSE[c]:
            raise BadHandle(f"handle {h} is stale: its block's pages now hold blocks of another size")
        b = self.mv[lay.amap_off + j] if r >= 0 else L.FREE
        if not (b == L.ALLOC or b >= L.TAG0):
            raise BadHandle(f"handle {h} is not a live block (already freed, or never allocated)")
        off = lay.index_offset(j) - self.q[w + S["start"]] * PAGE
        if c == 0:
            size = self.q[w + S["npages"]] * PAGE
            if off:
                raise BadHandle(f"handle {h} is not at the start of a block")
        else:
            size = CLASS_TO_SIZE[c]
            if off % size:
                raise BadHandle(f"handle {h} is not at the start of a block")
        if self.mv[self.lay.gmap_off + j] != gen:
            raise BadHandle(f"handle {h} is stale: its block was freed and the memory reused")
        return size

    # --- heap maintenance ---------------------------------------------------------------
    SCAVENGE_PAGES = 256  # pages per step of `scavenge` (2 MiB: well under a millisecond of madvise)

    def scavenge_step(
        self,
        actor=None,
        max_pages=SCAVENGE_PAGES,
        keep_pages=0,
        max_spans=8,
        background=False,
        freed_before=None,
    ):
        """One bounded step of PageHeap.scavenge under the heap lock, the world running (free
        spans belong to no P).  Returns (pages released, ns the heap lock was held)."""
        held = [0]

        def step(op):
            op.acquire(L.LOCK_HEAP)
            held[0] = time.perf_counter_ns()
            return self.heap.scavenge(op, max_pages, keep_pages, max_spans, background, freed_before)

        pages = self.run(self.daemon_actor if actor is None else actor, step)
        return pages, time.perf_counter_ns() - held[0]

    def scavenge(self, actor=None):
        """Give every idle page back to the OS now (MADV_REMOVE; Go: debug.FreeOSMemory), in
        bounded steps that each take the heap lock once.  Returns the bytes returned."""
        total = 0
        while True:
            pages, _ = self.scavenge_step(actor)
            if not pages:
                return total * PAGE
            total += pages

    def reserved_ranges(self):
        """[(offset, bytes)] of what is reserved whole, written or not: the fixed regions, every
        P slot ever claimed (Registry.claim) and the span table's pages under the records in
        use (PageHeap.reserve_records; a page reserved ahead of records_high is not listed)."""
        lay = self.lay
        out = lay.fixed_ranges() + [lay.slot_range(k) for k in self.registry.claimed()]
        return out + [lay.record_pages(self.heap.hget("records_high"))]

    def resident(self):
        """Resident bytes of the segment: "total" (st_blocks), "amap" (the allocation map),
        "meta" (every region before it) and "heap" (the rest); and, parts of "meta", "slots"
        (the P slots' region) and "spans" (the span table).  tmpfs reports a page that
        posix_fallocate reserved and nobody wrote as a hole to SEEK_DATA, though st_blocks counts
        it: so what is reserved whole (reserved_ranges: the fixed regions, the claimed slots with
        their undo logs, the span table's pages in use) counts whole; the rest of the metadata
        counts the pages written (SEEK_DATA/SEEK_HOLE, page by page); the heap's share is what
        they leave, and so includes the map entries reserved for committed pages but not yet
        written."""
        lay, fd = self.lay, self.fd
        whole = _merged(self.reserved_ranges())
        parts = dict.fromkeys(("amap", "meta", "slots", "spans"), 0)
        bounds = (
            ("meta", 0, lay.amap_off),
            ("amap", lay.amap_off, lay.heap_off),
            ("slots", lay.slots_off, lay.spans_off),
            ("spans", lay.spans_off, lay.pagemap_off),
        )
        runs = list(whole)  # then every run of written pages outside them
        pos = 0
        while pos < lay.heap_off:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data past pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs += _minus(start, end, whole)
            pos = end
        for start, end in runs:
            for part, lo, hi in bounds:
                parts[part] += max(0, min(end, hi) - max(start, lo))
        parts["total"] = os.fstat(fd).st_blocks * 512
        parts["heap"] = parts["total"] - parts["amap"] - parts["meta"]
        return parts

    def metadata(self):
        """Bytes of metadata reserved in tmpfs, by part: "fixed" (the regions reserved at
        creation), "slots" (the worker P slots ever claimed, with their undo logs), "spans" (the
        span table's OS pages under the records in use), "fine" (the OS pages of the maps' fine
        parts the fine-map table says are reserved), "coarse" (the maps' coarse parts over the
        committed heap, less the OS pages given back with released spans) and "pagemap" (the page
        map over the committed heap).  Computed from the layout, the heap's counters and the span
        table, as the allocator reserves and releases them (tests hold it to st_blocks)."""
        lay, q, os_page = self.lay, self.q, L.OS_PAGE
        committed = q[lay.heap_word() + H["committed_pages"]]
        released = [
            rec for rec in self.heap.span_records() if rec["state"] == L.SPAN_FREE and rec["released"]
        ]
        name = {
            lay.amap_off + lay.fine_bytes: "coarse",
            lay.gmap_off + lay.fine_bytes: "coarse",
            lay.pagemap_off + L.PREAMBLE * L.WORD: "pagemap",
        }
        out = dict.fromkeys(("fixed", "slots", "spans", "fine", "coarse", "pagemap"), 0)
        out["fixed"] = sum(n for _, n in lay.fixed_ranges())
        out["slots"] = sum(lay.slot_range(k)[1] for k in self.registry.claimed())
        out["spans"] = lay.record_pages(self.heap.hget("records_high"))[1]
        out["fine"] = 2 * os_page * q[lay.heap_word() + H["fine_map_pages"]]
        for base, per, given_back in lay.page_tables:
            end = base + committed * per
            n = (-(-end // os_page) - base // os_page) * os_page
            if given_back:
                for rec in released:
                    n -= sum(b for o, b in lay.released_meta(rec["start"], rec["npages"]) if base <= o < end)
            out[name[base]] += n
        return out

    # --- statistics (stats.py) ------------------------------------------------------------
    def flush_all(self, stopped=(), actor=None, keep_empty=False):
        """Flush every cache that may be flushed: the `stopped` Ps' and every dead P's."""
        for k in self.registry.active_slots():
            if k not in stopped and not self.registry.alive(k):
                self.reclaim(k, actor)
        return self.flush_slots([k for k in self.registry.active_slots() if k in stopped], actor, keep_empty)

    def update_stats(self, stopped=(), actor=None):
        """Go's updatememstats: flush every cache FIRST, then read the figures.  Reading before
        flushing is the bug of golang/go#38712 (the tests build it on purpose)."""
        self.flush_all(stopped, actor)
        return _stats.read_stats(self)

    def read_stats(self):
        return _stats.read_stats(self)

    def read_stats_slow(self):
        return _stats.read_stats_slow(self)

    # --- checks: each structure checks itself ---------------------------------------------
    def check_all(self, parts=None):
        """Every structural invariant of the arena and the identities of its figures (expensive:
        walks everything).  Run on a quiet arena (world stopped, or no workers).  Returns the list
        of problems; empty = healthy.  `parts` picks sections (None: every one, so a new check
        is run by every caller, the hypothesis model included), run in this order: locks and undo
        logs (Locks.check), the P slots (Registry.check), page heap (PageHeap.check), central lists and caches
        (CentralList.check), large objects (LargeObjects.check), allocation map
        (CentralList.check_amap), figures (stats.check_figures: identities, fast == slow)."""
        records = self.heap.span_records()
        checks = {
            "locks": lambda: self.locks.check(),
            "registry": lambda: self.registry.check(),
            "heap": lambda: self.heap.check(records),
            "central": lambda: self.central.check(records),
            "large": lambda: self.large.check(records),
            "amap": lambda: self.central.check_amap(records),
            "figures": lambda: _stats.check_figures(self, records),
        }
        bad = []
        for part in checks if parts is None else parts:
            bad += checks[part]()
        return bad

    def check(self):
        """Verify every structure and identity; raise CorruptionError naming what is broken."""
        problems = self.check_all()
        if problems:
            raise CorruptionError(
                "arena check failed: "
                + "; ".join(problems[:20])
                + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else "")
            )
