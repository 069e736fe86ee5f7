"""CentralList: one per size class, the spans not cached by any P (Go's mcentral).
See shm/__init__.py for an overview.

A central list holds `partial` spans (some object free) and `full` spans (none free), doubly
linked through the span records, plus the class's counters (layout.CENTRAL).  Everything here runs
inside an Op holding central lock c (checked); a span that becomes empty goes back to the page
heap, which takes the heap lock after central[c] -- the lock order.

The pairs to check against Go:
    cache_span / uncache_span   a P takes a span for its cache / gives it back
    collect                     a P re-lists the objects freed in a span it caches (mimalloc's
                                page collect: frees by the owner and PENDING frees by others)
    free_object                 a free of an object in a span this P does not cache

Object states live in the allocation map (layout.py: FREE, ALLOC, PENDING, LISTED, TAG(k)); the
state changes of a whole span are one `bytes.translate` over its object-start bytes.
"""

from itertools import compress
from operator import or_, sub

from . import layout as L
from .errors import BadHandle, CorruptionError, DoubleFree
from .locks import strided
from .sizeclasses import CLASS_TO_ALLOCNPAGES, CLASS_TO_NOBJS, CLASS_TO_SIZE

S = L.SPAN
C = L.CENTRAL
H = L.HEAP
PAGE = L.PAGE_SIZE
_OWNER, _ALLOC_COUNT, _NPENDING = S["owner"], S["alloc_count"], S["npending"]
_MALLOCS, _NCACHED, _LIVE = C["mallocs"], C["ncached"], C["live"]
FREE, ALLOC, PENDING, LISTED, RFREED = L.FREE, L.ALLOC, L.PENDING, L.LISTED, L.RFREED


def tag(k):
    return L.TAG0 + k


def judge(h, b, g, gen, what):
    """Raise unless handle h (generation `gen`) names the live object whose allocation-map byte
    is b and generation byte g: DoubleFree when h is the object's last handle and it is free (g
    one past gen) or its free waits in a remote-free buffer (RFREED), BadHandle when h is stale
    (the object was freed since h was its handle, and maybe allocated again)."""
    if g == gen and (b == ALLOC or b >= L.TAG0):
        return
    if (g == (gen + 1) & L.GEN_MASK and b in (FREE, LISTED, PENDING)) or (g == gen and b == RFREED):
        raise DoubleFree(
            f"double free: {what} is already free"
            + (" (freed by another process, its free not yet applied)" if b == RFREED else "")
        )
    raise BadHandle(f"handle {h} is stale: {what} was freed since it was handed out (and maybe reused)")


def _cache_table(k):
    t = bytearray(range(256))
    t[FREE] = t[PENDING] = LISTED
    t[ALLOC] = tag(k)
    return bytes(t)


def _uncache_table(k):
    t = bytearray(range(256))
    t[tag(k)] = ALLOC
    t[LISTED] = t[PENDING] = FREE
    return bytes(t)


def allocated(b):
    """Allocated objects among object-start bytes `b` (ALLOC or TAG(k))."""
    return sum(1 for x in b if x == L.ALLOC or x >= L.TAG0)


CACHE_T = [_cache_table(k) for k in range(L.MAX_SLOTS + 1)]
IS_LISTED = bytes(1 if v == LISTED else 0 for v in range(256))
UNCACHE_T = [_uncache_table(k) for k in range(L.MAX_SLOTS + 1)]
_BAD = 255


def _apply_table(j, k):
    """Object byte -> its state after P k's buffered free is applied (apply_frees), in a span
    cached by P j (j = -1: uncached); _BAD where the free is bad."""
    t = bytearray([_BAD]) * 256
    if j < 0:
        t[ALLOC] = t[RFREED] = FREE
    else:
        t[RFREED] = t[tag(j)] = FREE if j == k else PENDING
    return bytes(t)


_UNCACHED_T = _apply_table(-1, 0)
_OWN_T = [_apply_table(j, j) for j in range(L.MAX_SLOTS + 1)]  # cached by the P that freed
_OTHER_T = [_apply_table(j, -1) for j in range(L.MAX_SLOTS + 1)]  # cached by another P
IS_RFREED = bytes(1 if v == RFREED else 0 for v in range(256))
_IS_LAST_GEN = bytes(1 if v == L.GEN_MASK else 0 for v in range(256))
_NEXT_GEN = bytes((v + 1) & L.GEN_MASK for v in range(256))
_RFREED_B = bytes((RFREED,))


def handle_steps(j0, stride):
    """(base, step) of the handles of a span whose first object-start byte is map index j0, the
    next ones `stride` map bytes apart (in either part of the maps: a handle is its index): object i's handle at generation g is base + i * step + g
    (g < step, so a handle between two objects leaves a remainder no generation has)."""
    return (L.HANDLE_G0 + j0) << L.GEN_BITS, stride << L.GEN_BITS


def bumped(gens, mask):
    """Generation bytes `gens` with the generation of every object whose `mask` byte is 1 (the
    others 0) moved on by one, modulo 256: the generations after those objects were freed.  Byte
    arithmetic on two integers, not a loop: a byte that wraps (255 + 1) would carry into the next
    one, so that carry is taken back."""
    m = int.from_bytes(mask, "little")
    wraps = int.from_bytes(gens.translate(_IS_LAST_GEN), "little") & m
    return (int.from_bytes(gens, "little") + m - (wraps << 8)).to_bytes(len(gens), "little")


def freed(old, gens, j0, stride, handles, table):
    """Buffered frees `handles` (of one span, ascending) applied to its object-start bytes `old`
    and their generation bytes `gens` (one per object, the first object at granule j0, `stride`
    granules apart), each object byte going to table[byte] (_BAD: the free is bad).  A free is
    good when its object is still the one the handle named (same generation) and table says so;
    a handle named twice is applied once.  Returns (new bytes, new generations, objects freed:
    None when they are every RFREED object, else their indices).

    A group that names a good part of the span's objects is first checked in bulk, the common
    case: the handles are exactly those of the RFREED objects at their generations (one P freed
    them all, and every hint held).  Else, or for a few handles, each handle is judged."""
    n, m = len(old), len(handles)
    base, step = handle_steps(j0, stride)
    if m * 8 >= n:
        # Handle minus its object's handle at generation 0, object by object: the generation
        # bytes, if every handle names an RFREED object at its generation.
        at = range(base, base + n * step, step)
        if m == n:  # every object named: every one must be RFREED
            mask, want = None, gens if old.count(RFREED) == n else None
        else:
            mask = old.translate(IS_RFREED)
            if mask.count(1) == m:
                at, want = compress(at, mask), bytes(compress(gens, mask))
            else:
                want = None
        try:
            good = want is not None and bytes(map(sub, handles, at)) == want
        except ValueError:  # a difference outside 0..255: not a generation
            good = False
        if good:
            new_gens = gens.translate(_NEXT_GEN) if mask is None else bumped(gens, mask)
            return old.replace(_RFREED_B, bytes((table[RFREED],))), new_gens, None
    new, gens, changed = bytearray(old), bytearray(gens), []
    # h - base = i * step + generation for the handle of object i: one divmod gives both, and
    # a handle between two objects leaves a "generation" of 256 or more, which no byte is.
    gm = L.GEN_MASK
    for h in handles:
        i, gen = divmod(h - base, step)
        if 0 <= i < n and gens[i] == gen and (b := table[new[i]]) != _BAD:
            new[i] = b
            gens[i] = (gen + 1) & gm
            changed.append(i)
    return bytes(new), bytes(gens), changed


EMPTY_KEEP = 4  # spans a batch of remote frees empties that wait for the next refill of their
# class, at most per class, or more in a class whose spans hold few objects (EMPTY_KEEP_C): a
# producer -> consumer pipeline takes them back at once; more would only wait for the daemon's
# tick, which gives them all back in one operation
EMPTY_KEEP_BYTES = 1 << 20  # bytes of such spans a class keeps, at most, past EMPTY_KEEP spans
# As many as one full batch of remote frees can empty (RFREE_CAP objects: a 4 KiB consumer's batch
# empties 4 spans of 64), within EMPTY_KEEP_BYTES, and EMPTY_KEEP at least: by class.
EMPTY_KEEP_C = tuple(
    max(
        EMPTY_KEEP,
        min(L.RFREE_CAP // CLASS_TO_NOBJS[c], EMPTY_KEEP_BYTES // (CLASS_TO_ALLOCNPAGES[c] * PAGE)),
    )
    if c
    else 0
    for c in range(L.NCLASS)
)


class CentralList:
    """The central lists of every size class of one attached arena."""

    def __init__(self, arena):
        self.arena = arena
        self.q = arena.q
        self.mv = arena.mv
        self.lay = arena.lay
        self.heap = arena.heap

    def cw(self, c):
        return self.lay.central_word(c)

    def head_w(self, c, which):
        return self.cw(c) + C["partial" if which == L.LIST_PARTIAL else "full"]

    def starts(self, r):
        """(byte offset in the segment of the first object-start byte, stride, nelems, first
        map index, object size) of span r: in the maps' fine part for a fine class, in their
        coarse part for a coarse one (layout.py), `stride` map bytes apart.  The generation
        bytes are at the same offset from gmap_off as the object-start bytes from amap_off."""
        q, w = self.q, self.lay.span_word(r)
        c = q[w + S["sizeclass"]]
        size = CLASS_TO_SIZE[c]
        j0, grain = self.lay.span_index(q[w + S["start"]], c)
        return self.lay.amap_off + j0, size // grain, q[w + S["nelems"]], j0, size

    def gen_start(self, j0):
        """Byte offset in the segment of the generation byte of the object at granule j0."""
        return self.lay.gmap_off + j0

    def _gen_bytes(self, j0, stride, n):
        """The generation bytes of n objects, the first at map index j0, `stride` bytes apart."""
        return strided(self.mv, self.gen_start(j0), stride, n)

    def _place(self, op, c, r, alloc_count, nelems, keep_empty=False, idxs=(), values=(), from_w=None):
        """Put uncached span r where it belongs: full list, partial list, or back to the heap
        (an empty span; with keep_empty it waits on the partial list for free_empty).  The
        caller's own writes `idxs`, `values` (none a word the placing reads) are logged with the
        placing's first step, in one entry.  `from_w`: the head word of the list r is on now, if
        any: it leaves it in that step too (PageHeap.list_move), or first when it stays there."""
        heap = self.heap
        if alloc_count == 0 and not keep_empty:
            if from_w is not None:
                idxs, values = heap.list_remove_words(from_w, r, idxs, values)
            nw = self.cw(c) + C["nspans"]
            op.wset([*idxs, nw], [*values, self.q[nw] - 1])
            op.acquire(L.LOCK_HEAP)
            heap.free_span(op, r)
        else:
            which = L.LIST_FULL if alloc_count == nelems else L.LIST_PARTIAL
            if alloc_count == 0:  # an empty span waits: counted (nempty)
                ew = self.cw(c) + C["nempty"]
                idxs, values = [*idxs, ew], [*values, self.q[ew] + 1]
            to_w = self.head_w(c, which)
            if from_w is not None and from_w != to_w:
                heap.list_move(op, from_w, to_w, r, which, idxs, values)
                return
            if from_w is not None:  # back on the list it was on: its head, as a push puts it
                heap.list_remove(op, from_w, r)
            heap.list_push(op, to_w, r, which, idxs, values)

    # --- a P takes and gives back spans -------------------------------------------------------
    def grow(self, op, c):
        """A fresh span of class c from the page heap (Go: mcentral.grow), not on any list."""
        op.acquire(L.LOCK_HEAP)
        r = self.heap.alloc_span(op, CLASS_TO_ALLOCNPAGES[c], c, CLASS_TO_NOBJS[c])
        op.add(self.cw(c) + C["nspans"], 1)
        return r

    def cache_span(self, op, c, k):
        """Give P k a span of class c with a free object; returns (record, handles listed).  The
        span a flush took from P k (its slot's last[c]) when it still waits on the partial list,
        else the list's first: after a flush a P takes back the span that holds the objects it
        allocated, whose frees then stay local (a P that took another's would buffer every
        one of them as a remote free, for the next flush to apply), and the pages it touched."""
        op.need(L.LOCK_CENTRAL(c), "CentralList.cache_span")
        q, cw, sw = self.q, self.cw(c), self.lay.slot_word(k)
        head, last_w = q[self.head_w(c, L.LIST_PARTIAL)], sw + L.SLOT_LAST_AT + c
        last = q[last_w]
        if head and last and last != head and self._waits(c, last - 1):
            head = last
        r = head - 1 if head else self.grow(op, c)
        w, nc = self.lay.span_word(r), cw + C["ncached"]
        # Cached by P k: its owner, count and slot word, and the class's count, in one step with
        # the span's leaving the partial list; the hint is spent.
        idxs = [w + _OWNER, w + _ALLOC_COUNT, sw + L.SLOT_CACHED_AT + c, nc, last_w]
        values = [k + 1, 0, r + 1, q[nc] + 1, 0]
        if head:
            cnt, live, empty = q[w + _ALLOC_COUNT], cw + C["live"], cw + C["nempty"]
            idxs, values = [*idxs, live, empty], [*values, q[live] - cnt, q[empty] - (cnt == 0)]
            self.heap.list_remove(op, self.head_w(c, L.LIST_PARTIAL), r, idxs, values)
        else:
            op.wset(idxs, values)
        return r, self.collect(op, c, r, k)

    def _waits(self, c, r):
        """Does span r wait on class c's partial list?  Caller holds central lock c."""
        q, w = self.q, self.lay.span_word(r)
        return (
            q[w + S["state"]] == L.SPAN_INUSE
            and q[w + S["sizeclass"]] == c
            and q[w + S["list"]] == L.LIST_PARTIAL
            and not q[w + _OWNER]
        )

    def _retag(self, op, c, r, k, table, what, frees=()):
        """Translate the object-start bytes of span r, which P k must cache, with `table`.  First
        apply `frees`, groups of buffered frees of objects of span r (each group one P's), as
        apply_frees would, in the same run written once, and their generations moved on in one
        run too (nobody else writes either: P k is the caller or stopped).  Caller holds central
        lock c.  Returns (old bytes, new bytes, first map index, size, frees found bad in each
        group)."""
        op.need(L.LOCK_CENTRAL(c), what)
        owner = self.q[self.lay.span_word(r) + _OWNER]
        if owner != k + 1:
            raise CorruptionError(f"{what} of span {r} by P {k}, but it is cached by {owner - 1}")
        off, stride, n, j0, size = self.starts(r)
        old = strided(self.mv, off, stride, n)
        bad = []
        if frees:
            mid = old
            gens = new_gens = self._gen_bytes(j0, stride, n)
            # P k's table: a free by P k makes its object FREE, one by another P PENDING, which
            # the uncache that follows makes FREE as well.
            for handles in frees:
                mid, new_gens, changed = freed(mid, new_gens, j0, stride, handles, _OWN_T[k])
                bad.append(0 if changed is None else len(handles) - len(changed))
            op.wrun(self.gen_start(j0), stride, gens, new_gens)
            new = mid.translate(table)
        else:
            new = old.translate(table)
        op.wstarts(off, stride, old, new)
        return old, new, j0, size, bad

    def collect(self, op, c, r, k):
        """Re-list every free or PENDING object of span r (cached by P k) into P k's cache.
        Counts the newly listed objects as mallocs, optimistically (Go's cacheSpan).  Returns their
        handles, each with its object's generation (bumped when it was freed)."""
        old, new, j0, size, _ = self._retag(op, c, r, k, CACHE_T[k], "CentralList.collect")
        w = self.lay.span_word(r)
        if new == old and LISTED not in new and not self.q[w + _NPENDING]:
            return []  # nothing freed, nothing listed: the refill of a span handed out whole
        op.add(self.cw(c) + C["mallocs"], old.count(FREE) + old.count(PENDING))
        op.w(w + S["npending"], 0)
        # Highest address first, so list.pop() hands out ascending addresses.
        n, stride = len(new), size // L.CLASS_GRAIN[c]
        listed = new[::-1].translate(IS_LISTED)
        g0 = L.HANDLE_G0 + j0
        slots = compress(
            range((g0 + (n - 1) * stride) << L.GEN_BITS, (g0 << L.GEN_BITS) - 1, -stride << L.GEN_BITS),
            listed,
        )
        return list(map(or_, slots, compress(self._gen_bytes(j0, stride, n)[::-1], listed)))

    def uncache_span(self, op, c, r, k, keep_empty=False, frees=(), idxs=(), values=(), remember=False):
        """Take span r back from P k (Go: mcentral.uncacheSpan): objects still listed are
        uncounted, PENDING frees merged, and the span placed by its allocated count.  `frees`:
        groups of buffered frees of objects of span r (each from one P's remote-free buffer),
        applied first, in the same retag (_retag).  `idxs`, `values`: the caller's own word writes,
        logged with ours (words none of this reads).  `remember` (a flush): P k's next span of
        class c is this one if it still waits (cache_span).  Returns (listed objects uncounted,
        [frees found bad in each group])."""
        old, new, _, _, bad = self._retag(op, c, r, k, UNCACHE_T[k], "CentralList.uncache_span", frees)
        q, lay = self.q, self.lay
        w, n = lay.span_word(r), len(old)
        sw, cw = lay.slot_word(k), lay.central_word(c)
        # The P's local frees re-listed objects, each counted as a malloc to come (slot relists);
        # those still listed now never happened.
        rel_w, mal, nc, live = sw + L.SLOT_RELISTS_AT + c, cw + _MALLOCS, cw + _NCACHED, cw + _LIVE
        listed = old.count(LISTED)
        na = new.count(ALLOC) + new.count(RFREED)  # a buffered free is live until applied
        # Every word below is read before any is written, and none is one the placing reads: the
        # span's fields, P k's slot, the class's counters, all logged in one entry.
        idxs = (
            *idxs,
            mal,
            rel_w,
            w + _OWNER,
            w + _ALLOC_COUNT,
            w + _NPENDING,
            sw + L.SLOT_CACHED_AT + c,
            sw + L.SLOT_LAST_AT + c,
            nc,
            live,
        )
        last = r + 1 if remember else 0
        values = (*values, q[mal] + q[rel_w] - listed, 0, 0, na, 0, 0, last, q[nc] - 1, q[live] + na)
        self._place(op, c, r, na, n, keep_empty, idxs, values)
        return listed, bad

    def free_empty(self, op, c):
        """Return every empty span of the partial list to the heap (they wait there when a
        stop-the-world flush kept them, to keep the pause short).  Returns how many."""
        op.need(L.LOCK_CENTRAL(c), "CentralList.free_empty")
        q, n = self.q, 0
        r = q[self.head_w(c, L.LIST_PARTIAL)] - 1
        while r >= 0:
            w = self.lay.span_word(r)
            nxt = q[w + S["next"]] - 1
            if q[w + S["alloc_count"]] == 0:
                ew = self.cw(c) + C["nempty"]
                self.heap.list_remove(op, self.head_w(c, L.LIST_PARTIAL), r, [ew], [q[ew] - 1])
                self._place(op, c, r, 0, q[w + S["nelems"]])
                op.log.clear()  # checkpoint: each span freed is a consistent state
                n += 1
            r = nxt
        return n

    # --- frees that are not the fast path ------------------------------------------------
    def apply_frees(self, op, c, r, handles, k):
        """Apply buffered frees (handles of span r, class c) made by P k of objects it did not
        cache when it freed them (Go has no such thing; tcmalloc's transfer cache and mimalloc's
        delayed frees do).  Each was a live object when P k buffered it; one that no longer is --
        a double free split across processes -- is skipped, never applied twice.  Returns the
        number skipped.  One retag of the span's bytes for the whole group.  Caller: P k itself,
        or the flusher of a stopped or dead P k."""
        op.need(L.LOCK_CENTRAL(c), "CentralList.apply_frees")
        q, w = self.q, self.lay.span_word(r)
        off, stride, n, j0, size = self.starts(r)
        old = strided(self.mv, off, stride, n)
        gens = self._gen_bytes(j0, stride, n)
        owner = q[w + S["owner"]]
        # What each object byte becomes (BAD_T: the free is bad).  RFREED: our hint held, nobody
        # could hand the object out.  ALLOC or TAG(owner): the hint was overwritten by a retag,
        # which only ever writes allocated states over allocated ones -- the object stayed
        # allocated.  Anything else: it was freed since.  And the object must still carry the
        # handle's generation: a free applied bumps it, so a second buffered free of the same
        # handle, or a late one that meets the object allocated again, is bad.
        table = _UNCACHED_T if not owner else (_OWN_T if owner == k + 1 else _OTHER_T)[owner - 1]
        new, new_gens, changed = freed(old, gens, j0, stride, handles, table)
        nfreed = len(handles) if changed is None else len(changed)
        if not nfreed:
            return len(handles)
        if owner and owner != k + 1:
            # Only the objects freed, in one log entry: the owner runs, and its fast path writes
            # the others (and their generations) meanwhile.
            if changed is None:
                changed = list(compress(range(n), old.translate(IS_RFREED)))
            offs = [off + i * stride for i in changed]
            to_gen = self.lay.gmap_off - self.lay.amap_off
            offs += [o + to_gen for o in offs]
            op.wscatter(offs, [new[i] for i in changed] + [new_gens[i] for i in changed])
            op.add(w + S["npending"], nfreed)
            return len(handles) - nfreed
        # Nobody else writes these bytes now (an uncached span's are written under our lock, P k's
        # own by P k, which is us or stopped) but for another P's RFREED hint over an allocated
        # object, which a retag may overwrite (see the table above): each run written whole.
        op.wstarts(off, stride, old, new)
        op.wrun(self.gen_start(j0), stride, gens, new_gens)
        if not owner:
            cnt, cw = q[w + _ALLOC_COUNT], self.cw(c)
            idxs, values = [w + _ALLOC_COUNT, cw + _LIVE], [cnt - nfreed, q[cw + _LIVE] - nfreed]
            # Emptied, it waits on the partial list -- EMPTY_KEEP_C[c] of them at most: in a
            # producer -> consumer pipeline the producer takes it again at its next refill, with
            # no page-heap operation on either side.  The daemon gives back the ones nobody took
            # each second (Arena.free_empty_spans); the others go back to the heap now.
            keep = q[cw + C["nempty"]] < EMPTY_KEEP_C[c]
            self._place(op, c, r, cnt - nfreed, n, keep, idxs, values, self.head_w(c, q[w + S["list"]]))
        return len(handles) - nfreed

    def free_object(self, op, c, r, h, k):
        """Free object `h` of span r (class c) on behalf of P k (-1: no P).  Validates first,
        changes nothing on a bad handle."""
        op.need(L.LOCK_CENTRAL(c), "CentralList.free_object")
        q, w = self.q, self.lay.span_word(r)
        off, stride, n, j0, size = self.starts(r)
        j, gen = L.handle_index(h)
        i, rem = divmod(j - j0, stride)
        if (j < self.lay.fine_bytes) != (j0 < self.lay.fine_bytes):
            raise BadHandle(
                f"handle {h} is stale: its block's pages now hold blocks of {size} bytes, "
                "a size class of the other map part"
            )
        if rem or not 0 <= i < n:
            raise BadHandle(
                f"handle {h} is inside a block of {size} bytes but not at its start"
                if 0 <= i < n
                else f"handle {h} is in the tail of a span, past its last object"
            )
        boff = off + i * stride
        b = self.mv[boff]
        goff = self.lay.gmap_off + j
        judge(h, b, self.mv[goff], gen, f"block {h} ({size} bytes)")
        op.wbyte(goff, (gen + 1) & L.GEN_MASK)  # freed now: its next handle
        owner = q[w + S["owner"]]
        if b == ALLOC:
            if owner:
                raise CorruptionError(f"span {r} is cached by P {owner - 1} but object {h} is ALLOC")
            op.wbyte(boff, FREE)
            cnt, live = q[w + S["alloc_count"]], self.cw(c) + C["live"]
            from_w = self.head_w(c, q[w + S["list"]])
            idxs, values = [w + S["alloc_count"], live], [cnt - 1, q[live] - 1]
            self._place(op, c, r, cnt - 1, q[w + S["nelems"]], False, idxs, values, from_w)
            return
        j = b - L.TAG0
        if owner != j + 1:
            raise CorruptionError(
                f"object {h} carries the tag of P {j} but span {r} is cached by {owner - 1}"
            )
        if j == k:
            op.wbyte(boff, FREE)  # our own span: collected on our next refill
        else:
            op.wbyte(boff, PENDING)
            op.add(w + S["npending"], 1)

    # --- the structure's own check (Arena.check_all) -------------------------------------------
    def object_bytes(self, rec):
        """The allocation-map bytes of a small span's object starts (`rec`: a span_records() dict),
        read in the map part its class uses (the other part may not be reserved there)."""
        c = rec["sizeclass"]
        j0, grain = self.lay.span_index(rec["start"], c)
        off, stride = self.lay.amap_off + j0, CLASS_TO_SIZE[c] // grain
        return bytes(self.mv[off : off + rec["nelems"] * stride : stride])

    def check(self, records):
        """Central lists, caches and counters agree with the spans and their object bytes
        (`records`: PageHeap.span_records()).  Returns the problems."""
        arena = self.arena
        q, lay, bad = self.q, self.lay, []
        # Central lists and caches.
        owner_of = {}
        for k in arena.registry.claimed():
            for c in range(L.NCLASS):
                v = q[lay.slot_word(k) + L.SLOT_CACHED_AT + c]
                if v:
                    owner_of[v - 1] = (k, c)
        buffered = {
            L.handle_index(h)[0] for k in arena.registry.claimed() for h in arena.buffered_frees(k) if h
        }
        for c in range(1, L.NCLASS):
            cw = lay.central_word(c)
            on_list = {}
            for which, name in ((L.LIST_PARTIAL, "partial"), (L.LIST_FULL, "full")):
                r, prev = q[cw + C[name]] - 1, -1
                while r >= 0:
                    if r in on_list:
                        bad.append(f"class {c} {name} list: span {r} twice")
                        break
                    on_list[r] = which
                    w = lay.span_word(r)
                    if q[w + S["prev"]] != prev + 1:
                        bad.append(f"class {c} {name} list: span {r} prev link broken")
                    prev, r = r, q[w + S["next"]] - 1
            live = nspans = ncached = nempty = 0
            for rec in records:
                if rec["state"] != L.SPAN_INUSE or rec["sizeclass"] != c:
                    continue
                nspans += 1
                r = rec["r"]
                b = self.object_bytes(rec)
                alloc = allocated(b)
                rfreed = b.count(L.RFREED)
                if rfreed:
                    j0, grain = lay.span_index(rec["start"], c)
                    stride = CLASS_TO_SIZE[c] // grain
                    lost = [
                        (L.HANDLE_G0 + j0 + i * stride) << L.GEN_BITS
                        for i, x in enumerate(b)
                        if x == L.RFREED and j0 + i * stride not in buffered
                    ]
                    if lost:
                        bad.append(
                            f"span {r}: objects {lost[:4]} are RFREED but in no P's remote-free buffer"
                        )
                if rec["owner"]:
                    ncached += 1
                    k = rec["owner"] - 1
                    if owner_of.get(r) != (k, c):
                        bad.append(f"span {r} says it is cached by P {k} but slot {k} does not cache it")
                    allowed = {L.FREE, L.PENDING, L.LISTED, L.RFREED, L.TAG0 + k}
                    if b.count(L.PENDING) != rec["npending"]:
                        bad.append(
                            f"span {r}: npending {rec['npending']} != PENDING bytes {b.count(L.PENDING)}"
                        )
                    if r in on_list:
                        bad.append(f"span {r} is cached by P {k} and on a central list")
                else:
                    allowed = {L.FREE, L.ALLOC, L.RFREED}
                    live += rec["alloc_count"]
                    nempty += rec["alloc_count"] == 0
                    if alloc + rfreed != rec["alloc_count"]:  # a buffered free is live until applied
                        bad.append(
                            f"span {r} (class {c}): alloc_count {rec['alloc_count']} != allocated objects "
                            f"{alloc} + RFREED {rfreed}"
                        )
                    alloc += rfreed
                    # An empty span may wait on the partial list (Arena.free_empty_spans).
                    want = L.LIST_FULL if alloc == rec["nelems"] else L.LIST_PARTIAL
                    if on_list.get(r) != want or rec["list"] != want:
                        bad.append(
                            f"span {r} (class {c}, {alloc}/{rec['nelems']} allocated) on list {on_list.get(r)}, want {want}"
                        )
                odd = set(b) - allowed
                if odd:
                    bad.append(f"span {r} (class {c}, owner {rec['owner']}) has object bytes {sorted(odd)}")
            if live != q[cw + C["live"]]:
                bad.append(
                    f"class {c}: central live {q[cw + C['live']]} != allocated objects in uncached spans {live}"
                )
            if nspans != q[cw + C["nspans"]]:
                bad.append(f"class {c}: central nspans {q[cw + C['nspans']]} != in-use spans {nspans}")
            if nempty != q[cw + C["nempty"]]:
                bad.append(
                    f"class {c}: central nempty {q[cw + C['nempty']]} != empty uncached spans {nempty}"
                )
            if ncached != q[cw + C["ncached"]]:
                bad.append(f"class {c}: central ncached {q[cw + C['ncached']]} != cached spans {ncached}")
        for r, (k, c) in owner_of.items():
            w = lay.span_word(r)
            if q[w + S["owner"]] != k + 1 or q[w + S["sizeclass"]] != c or q[w + S["state"]] != L.SPAN_INUSE:
                bad.append(f"slot {k} caches span {r} for class {c}, but the span disagrees")
        return bad

    def check_amap(self, records):
        """Only object starts of in-use spans have non-zero allocation-map bytes: small spans'
        (object_bytes) and large spans' one start byte, whose value LargeObjects.check judges.
        Every handle waiting in a remote-free buffer carries its object's generation.  Returns the
        problems."""
        q, lay, mv, bad = self.q, self.lay, self.mv, []
        # What is read: the coarse part over the committed heap, less the OS pages given back with
        # released spans, and the fine part only where the fine-map table says it is reserved.  A
        # read of anything else would fault a page in again (SIGBUS on a full /dev/shm).
        lo = lay.amap_off + lay.fine_bytes
        hi = lo + q[lay.heap_word() + H["committed_pages"]] * L.COARSE_PER_PAGE
        gone = sorted(
            g
            for rec in records
            if rec["state"] == L.SPAN_FREE and rec["released"]
            for g in lay.released_meta(rec["start"], rec["npages"])
            if lo <= g[0] < hi
        )
        flags = bytes(mv[lay.finemap_flags : lay.finemap_flags + lay.fine_os_pages])
        read = [
            (lay.amap_off + p * L.OS_PAGE, lay.amap_off + min((p + 1) * L.OS_PAGE, lay.fine_bytes))
            for p, f in enumerate(flags)
            if f
        ]
        at = lo
        for off, n in [*gone, (hi, 0)]:
            read.append((at, off))
            at = off + n
        nonzero = 0
        for a, b in read:
            seg = bytes(mv[a:b])
            nonzero += len(seg) - seg.count(0)
        starts_nonzero = 0
        for rec in records:
            if rec["state"] != L.SPAN_INUSE:
                continue
            if rec["sizeclass"] == 0:
                starts_nonzero += mv[lay.amap_off + lay.span_index(rec["start"], 0)[0]] != 0
            else:
                b = self.object_bytes(rec)
                starts_nonzero += len(b) - b.count(0)
        if nonzero != starts_nonzero:
            bad.append(
                f"allocation map has {nonzero} non-zero bytes, object starts account for {starts_nonzero} "
                "(a byte set outside an object start, or in a free span)"
            )
        # A buffered free has not bumped its object's generation yet (it does when applied).
        for k in self.arena.registry.claimed():
            for h in self.arena.buffered_frees(k):
                j, gen = L.handle_index(h)
                if h and (not 0 <= j < lay.amap_bytes or self.mv[lay.gmap_off + j] != gen):
                    bad.append(f"P {k}'s remote-free buffer holds handle {h}, not its object's generation")
        return bad
