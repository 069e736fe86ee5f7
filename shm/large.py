"""Large objects (over 32 KiB): a span each, owned by the P that allocated it.
See shm/__init__.py for an overview.

Go gives each P a cache of free pages (pageCache) so that most large allocations take no lock.
Here a large span stays *owned* by the P that allocated it -- its object byte is TAG(k), its
record's owner k+1, and it sits on P k's list (slot word lg_head, linked through the records'
next/prev, tag LIST_LARGE, under the heap lock) -- until a flush:

    TAG(k)    allocated, owned by P k: P k frees it with one byte store (the fast path)
    LISTED    freed by P k and kept in P k's large cache for the next allocation of the same
              page count, counted as a malloc optimistically (slot words lg_relists and
              lg_relist_pages, folded into the heap figures at flush) -- Go's nmalloc trick
    PENDING   freed by another P (its buffered free, applied under the heap lock), and counted
              freed then; P k gives its pages back to the heap at its next large slow path, or
              its flusher does (lg_pending)
    ALLOC     allocated, owned by nobody (its P was flushed); freed under the heap lock

Heap counters (layout.HEAP large_*) count an owned span as live until it is freed (under the heap
lock, or marked PENDING); the optimistic mallocs and the spans still LISTED are settled at flush.
Every method runs inside an Op that holds the heap lock (checked).
"""

from . import layout as L
from .central import judge
from .errors import BadHandle, CorruptionError

S = L.SPAN
H = L.HEAP
SL = L.SLOT
PAGE = L.PAGE_SIZE


class LargeObjects:
    def __init__(self, arena):
        self.arena = arena
        self.q = arena.q
        self.mv = arena.mv
        self.lay = arena.lay
        self.heap = arena.heap
        self.hw = arena.lay.heap_word()

    def head_w(self, k):
        return self.lay.slot_word(k) + SL["lg_head"]

    def owned(self, k):
        """Records of the large spans P k owns (a read; caller holds the heap lock or k is quiet)."""
        q, out = self.q, []
        r = q[self.head_w(k)] - 1
        while r >= 0:
            out.append(r)
            r = q[self.lay.span_word(r) + S["next"]] - 1
        return out

    def alloc(self, op, npages, k):
        """A new large span of `npages` pages owned by P k (k = -1: owned by nobody).  Returns
        the handle.  Counts it as a malloc (heap lock)."""
        op.acquire(L.LOCK_HEAP)
        r = self.heap.alloc_span(op, npages, 0, 1)
        w = self.lay.span_word(r)
        h = self.base(r)
        if k >= 0:
            op.wbyte(self.lay.amap_byte(h), L.TAG0 + k)
            op.w(w + S["owner"], k + 1)
            self.heap.list_push(op, self.head_w(k), r, L.LIST_LARGE)
        else:
            op.wbyte(self.lay.amap_byte(h), L.ALLOC)
        op.add(self.hw + H["large_mallocs"], 1)
        op.add(self.hw + H["large_live"], 1)
        op.add(self.hw + H["large_live_pages"], npages)
        op.add(self.hw + H["large_total_bytes"], npages * PAGE)
        return h

    def _give_back(self, op, r, h, was_live, optimistic=False):
        """Return span r (object h, owned or not) to the page heap.  `was_live`: the heap counters
        still count it live; `optimistic`: it was also counted as a malloc that never happened."""
        q, w = self.q, self.lay.span_word(r)
        npages = q[w + S["npages"]]
        owner = q[w + S["owner"]]
        if owner:
            self.heap.list_remove(op, self.head_w(owner - 1), r)
            op.w(w + S["owner"], 0)
        op.wbyte(self.lay.amap_byte(h), L.FREE)
        if was_live:
            op.add(self.hw + H["large_live"], -1)
            op.add(self.hw + H["large_live_pages"], -npages)
        if optimistic:
            op.add(self.hw + H["large_mallocs"], -1)
            op.add(self.hw + H["large_total_bytes"], -npages * PAGE)
        self.heap.free_span(op, r)

    def base(self, r):
        """The handle of span r's object, with the generation it has now."""
        off = self.q[self.lay.span_word(r) + S["start"]] * PAGE
        return L.make_handle(off, self.mv[self.lay.gmap_off + (off >> 3)])

    def free(self, op, r, h, k, buffered=False):
        """Free large object h (span r) now, on behalf of P k (-1: no P): validates first and
        changes nothing on a bad handle.  `buffered`: the free comes from P k's remote-free
        buffer, which marked the object RFREED.  Returns False when the object is owned by another
        P and was only marked PENDING for it."""
        op.need(L.LOCK_HEAP, "LargeObjects.free")
        q, w = self.q, self.lay.span_word(r)
        at, gen = L.handle_granule(h)
        if at != q[w + S["start"]] * (PAGE >> 3):
            raise BadHandle(
                f"handle {h} is inside a large block of {q[w + S['npages']] * PAGE} bytes but not at its start"
            )
        b = self.mv[self.lay.amap_byte(h)]
        owner = q[w + S["owner"]]
        if b == L.RFREED and buffered:
            b = L.TAG0 + owner - 1 if owner else L.ALLOC  # our hint held (central.apply_frees)
        judge(h, b, self.mv[self.lay.gmap_byte(h)], gen, f"large block {h}")
        op.wbyte(self.lay.gmap_byte(h), (gen + 1) & L.GEN_MASK)  # freed now: its next handle
        if b == L.ALLOC and not owner:
            self._give_back(op, r, h, was_live=True)
            return True
        if b >= L.TAG0 and owner == b - L.TAG0 + 1:
            j = b - L.TAG0
            if j == k:
                self._give_back(op, r, h, was_live=True)
                return True
            # Freed now, in the figures too; only its pages wait for the owner to give them back.
            op.wbyte(self.lay.amap_byte(h), L.PENDING)
            op.add(self.hw + H["large_live"], -1)
            op.add(self.hw + H["large_live_pages"], -q[w + S["npages"]])
            op.add(self.lay.slot_word(j) + SL["lg_pending"], 1)
            return False
        raise CorruptionError(f"large block {h}: object byte {b}, span owner {owner}")

    def collect_pending(self, op, k, room=0, least=0):
        """P k takes back the spans other Ps freed (PENDING): as many as `room` pages allow (each
        charged at least `least`) become LISTED, for its large cache (counted live again, and as a malloc to come, as a local free
        counts them), the rest go back to the heap.  Returns ([(handle, pages) relisted],
        [handles given back]).  Checkpoints after each span: call it before anything else in the
        operation.  A producer whose blocks a consumer frees so allocates them again without a
        lock, as it would have had it freed them itself."""
        op.need(L.LOCK_HEAP, "LargeObjects.collect_pending")
        q, kept, gone = self.q, [], []
        if not q[self.lay.slot_word(k) + SL["lg_pending"]]:
            return kept, gone
        for r in self.owned(k):
            h = self.base(r)
            if self.mv[self.lay.amap_byte(h)] != L.PENDING:
                continue
            npages = q[self.lay.span_word(r) + S["npages"]]
            charge = max(npages, least)
            if charge <= room:
                room -= charge
                op.wbyte(self.lay.amap_byte(h), L.LISTED)
                op.add(self.hw + H["large_live"], 1)
                op.add(self.hw + H["large_live_pages"], npages)
                op.add(self.hw + H["large_mallocs"], 1)
                op.add(self.hw + H["large_total_bytes"], npages * PAGE)
                kept.append((h, npages))
            else:
                self._give_back(op, r, h, was_live=False)
                gone.append(h)
            op.log.clear()  # checkpoint: any number of spans, a bounded undo log
        op.w(self.lay.slot_word(k) + SL["lg_pending"], 0)
        return kept, gone

    def flush(self, op, k, disown=True):
        """Flush P k's large cache (Go: the pageCache flush): fold its optimistic mallocs into the
        heap figures and give back every span it keeps LISTED or another P freed.  `disown`: also
        disown the spans still allocated (the P is leaving or dead); a snapshot leaves them owned
        -- they are live in the heap figures either way, and the P frees them without a lock
        later.  Checkpoints after each span.  Returns the spans handled."""
        op.need(L.LOCK_HEAP, "LargeObjects.flush")
        q, mv, lay, sw = self.q, self.mv, self.lay, self.lay.slot_word(k)
        rel_w, pages_w = sw + SL["lg_relists"], sw + SL["lg_relist_pages"]
        rel, rel_pages = q[rel_w], q[pages_w]
        if rel or rel_pages:
            mal, total = self.hw + H["large_mallocs"], self.hw + H["large_total_bytes"]
            op.wset((mal, total, rel_w, pages_w), (q[mal] + rel, q[total] + rel_pages * PAGE, 0, 0))
            op.log.clear()  # checkpoint
        n, mine, start = 0, L.TAG0 + k, S["start"]
        for r in self.owned(k):
            b = mv[lay.amap_byte(L.make_handle(q[lay.span_word(r) + start] * PAGE, 0))]
            if (b == mine or b == L.RFREED) and not disown:
                # Still allocated (RFREED: freed by another P whose buffer is not applied yet;
                # it stays RFREED, and the buffer frees it unowned), and it stays owned.
                continue
            h = self.base(r)
            if b == mine or b == L.RFREED:
                self.heap.list_remove(op, self.head_w(k), r)
                op.w(self.lay.span_word(r) + S["owner"], 0)
                if b != L.RFREED:
                    op.wbyte(self.lay.amap_byte(h), L.ALLOC)
            elif b == L.LISTED:
                self._give_back(op, r, h, was_live=True, optimistic=True)
            elif b == L.PENDING:
                self._give_back(op, r, h, was_live=False)
            else:
                raise CorruptionError(f"large span {r} on P {k}'s list has object byte {b}")
            op.log.clear()  # checkpoint
            n += 1
        op.w(sw + SL["lg_pending"], 0)
        return n

    # --- the structure's own check (Arena.check_all) -------------------------------------------
    def check(self, records):
        """Every in-use large span's start byte agrees with its owner and list: an unowned one is
        ALLOC, one owned by P k is TAG(k), LISTED or PENDING on P k's list; RFREED only while a
        P's remote-free buffer holds it (`records`: PageHeap.span_records()).  Returns the
        problems."""
        arena = self.arena
        q, lay, bad = self.q, self.lay, []
        committed = q[self.hw + H["committed_pages"]]
        buffered = {L.handle_granule(h)[0] for k in range(lay.nslots) for h in arena.buffered_frees(k) if h}
        amap = self.mv[lay.amap_off : lay.amap_off + committed * PAGE // 8]
        for rec in records:
            if rec["state"] != L.SPAN_INUSE or rec["sizeclass"] != 0:
                continue
            b0 = amap[rec["start"] * PAGE // 8]
            k = rec["owner"] - 1
            if b0 == L.RFREED and rec["start"] * PAGE // 8 not in buffered:
                bad.append(f"large span {rec['r']} is RFREED but in no P's remote-free buffer")
            if k < 0 and (b0 not in (L.ALLOC, L.RFREED) or rec["list"] != L.LIST_NONE):
                bad.append(
                    f"large span {rec['r']}: start byte {b0}, list {rec['list']}; an unowned one is ALLOC"
                )
            elif k >= 0 and (
                b0 not in (L.TAG0 + k, L.LISTED, L.PENDING, L.RFREED)
                or rec["list"] != L.LIST_LARGE
                or rec["r"] not in self.owned(k)
            ):
                bad.append(
                    f"large span {rec['r']} owned by P {k}: start byte {b0}, list {rec['list']}, "
                    "want TAG(k), LISTED or PENDING on P k's list"
                )
        amap.release()
        return bad
