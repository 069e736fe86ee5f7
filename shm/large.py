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
    RFREED    freed by another P, the free in that P's remote-free buffer: P k takes it back out
              of the buffer at its next large slow path that wants one (take_back: LISTED, as a
              local free makes it), else the buffer's apply makes it PENDING
    PENDING   freed by another P (its buffered free, applied under the heap lock), and counted
              freed then; on P k's pending list (lg_pend_head) until P k's next large slow paths
              take it back into the large cache or give its pages back to the heap, or a flush
              of a leaving P does (collect_pending, flush)
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

    def pend_w(self, k):
        return self.lay.slot_word(k) + SL["lg_pend_head"]

    def _list(self, head_w):
        q, out = self.q, []
        r = q[head_w] - 1
        while r >= 0:
            out.append(r)
            r = q[self.lay.span_word(r) + S["next"]] - 1
        return out

    def pending(self, k):
        """Records of P k's spans that other Ps freed (PENDING), newest first."""
        return self._list(self.pend_w(k))

    def owned(self, k):
        """Records of the large spans P k owns, PENDING ones included (a read; caller holds the
        heap lock or k is quiet)."""
        return self._list(self.head_w(k)) + self.pending(k)

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
            if q[w + S["list"]] == L.LIST_LPENDING:
                sw = self.lay.slot_word(owner - 1)
                idxs = [sw + SL["lg_pending"], sw + SL["lg_pend_pages"]]
                values = [q[idxs[0]] - 1, q[idxs[1]] - npages]
                self.heap.list_remove(op, self.pend_w(owner - 1), r, idxs, values)
            else:
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
        """The handle of span r's object, with the generation it has now (a large object's map
        bytes are in the maps' coarse part)."""
        j = self.lay.span_index(self.q[self.lay.span_word(r) + S["start"]], 0)[0]
        return (L.HANDLE_G0 + j) << L.GEN_BITS | self.mv[self.lay.gmap_off + j]

    def free(self, op, r, h, k, buffered=False):
        """Free large object h (span r) now, on behalf of P k (-1: no P): validates first and
        changes nothing on a bad handle.  `buffered`: the free comes from P k's remote-free
        buffer, which marked the object RFREED.  Returns False when the object is owned by another
        P and was only marked PENDING for it."""
        op.need(L.LOCK_HEAP, "LargeObjects.free")
        q, lay = self.q, self.lay
        w = lay.span_word(r)
        at, gen = L.handle_index(h)
        if at < lay.fine_bytes:
            raise BadHandle(f"handle {h} is stale: its block's pages now hold a large block")
        if at != lay.span_index(q[w + S["start"]], 0)[0]:
            raise BadHandle(
                f"handle {h} is inside a large block of {q[w + S['npages']] * PAGE} bytes but not at its start"
            )
        gen_b = lay.gmap_off + at
        b, g = self.mv[lay.amap_off + at], self.mv[gen_b]
        owner = q[w + S["owner"]]
        if b == L.RFREED and buffered:
            b = L.TAG0 + owner - 1 if owner else L.ALLOC  # our hint held (central.apply_frees)
        if g != gen or (b != L.ALLOC and b < L.TAG0):  # not the live block h names
            judge(h, b, g, gen, f"large block {h}")  # raises, saying why
            raise CorruptionError(f"large block {h}: judged live, object byte {b}, generation {g}")
        next_gen = (gen + 1) & L.GEN_MASK  # freed now: its next handle
        if b == L.ALLOC and not owner:
            op.wbyte(gen_b, next_gen)
            self._give_back(op, r, h, was_live=True)
            return True
        if b >= L.TAG0 and owner == b - L.TAG0 + 1:
            j = b - L.TAG0
            if j == k:
                op.wbyte(gen_b, next_gen)
                self._give_back(op, r, h, was_live=True)
                return True
            # Freed now, in the figures too; only its pages wait for the owner to take them back
            # (into its large cache) or give them back to the heap, on its pending list.  Its two
            # map bytes are one log entry, its move and the counters one step.
            npages = q[w + S["npages"]]
            op.wscatter((gen_b, lay.amap_off + at), (next_gen, L.PENDING))
            sj, hw = self.lay.slot_word(j), self.hw
            idxs = [
                hw + H["large_live"],
                hw + H["large_live_pages"],
                sj + SL["lg_pending"],
                sj + SL["lg_pend_pages"],
                hw + H["large_pending_frees"],
            ]
            values = [
                q[idxs[0]] - 1,
                q[idxs[1]] - npages,
                q[idxs[2]] + 1,
                q[idxs[3]] + npages,
                q[idxs[4]] + 1,
            ]
            self.heap.list_move(op, self.head_w(j), self.pend_w(j), r, L.LIST_LPENDING, idxs, values)
            return False
        raise CorruptionError(f"large block {h}: object byte {b}, span owner {owner}")

    def _buffered(self, h):
        """The record word of the large span whose block `h` names while that block is RFREED
        (its free waits in some P's remote-free buffer), else None.  Caller holds the heap lock."""
        r = self.heap.span_of_page(self.lay.handle_page(h))
        if r < 0:
            return None
        w = self.lay.span_word(r)
        if self.q[w + S["sizeclass"]] or self.base(r) != h or self.mv[self.lay.amap_byte(h)] != L.RFREED:
            return None
        return w

    def waiting(self, op, k, handles):
        """Of `handles`, frees of large blocks in P k's remote-free buffer, those their owner may
        still take back out of it (take_back): the block RFREED, on a span another P owns.
        Returns [(handle, pages, owner)].  Read under the heap lock, which every take_back
        holds."""
        op.need(L.LOCK_HEAP, "LargeObjects.waiting")
        q, out = self.q, []
        for h in handles:
            w = self._buffered(h)
            if w is not None and q[w + S["owner"]] not in (0, k + 1):
                out.append((h, q[w + S["npages"]], q[w + S["owner"]] - 1))
        return out

    def give_back_listed(self, op, k, handles):
        """Give back to the heap the spans of `handles`, LISTED in P k's large cache (the P
        makes room in it for blocks of another size).  Checkpoints after each span."""
        op.need(L.LOCK_HEAP, "LargeObjects.give_back_listed")
        lay = self.lay
        for h in handles:
            r = self.heap.span_of_page(lay.handle_page(h))
            if (
                r < 0
                or self.q[lay.span_word(r) + S["owner"]] != k + 1
                or self.base(r) != h
                or self.mv[lay.amap_byte(h)] != L.LISTED
            ):
                raise CorruptionError(f"large block {h} is not in P {k}'s large cache")
            self._give_back(op, r, h, was_live=True, optimistic=True)
            op.log.clear()  # checkpoint

    def take_back(self, op, k, cands, room, least):
        """P k takes back, out of the remote-free buffers of the Ps that freed them, large blocks
        of its own still RFREED there, as many as `room` pages allow (each charged at least
        `least`): each becomes LISTED for its large cache, counted as its local free counts one
        (lg_relists), and its buffer entry 0 (an entry already applied) -- all of them in one
        step: at most LARGE_CACHE_SPANS blocks, two log entries.  mimalloc's owner collecting
        its thread-delayed frees: the Ps that freed them never take the heap lock for them, and
        the P never waits for them on its pending list.  `cands`: (P j, entry m, handle) read
        from the buffers without a lock; each is checked here, under the heap lock that every
        apply of a buffer holds, so no entry is applied by both.  Returns [(next handle, pages)]
        taken."""
        op.need(L.LOCK_HEAP, "LargeObjects.take_back")
        q, lay, out = self.q, self.lay, []
        sw = lay.slot_word(k)
        rel_w, pages_w = sw + SL["lg_relists"], sw + SL["lg_relist_pages"]
        entries, offs, values, pages = [], [], [], 0
        for j, m, h in cands:
            sj = lay.slot_word(j)
            e = sj + L.SLOT_RFREE_AT + m
            if m >= q[sj + SL["rfree_n"]] or q[e] != h:
                continue  # applied meanwhile: PENDING for us, or bad
            w = self._buffered(h)
            if w is None or q[w + S["owner"]] != k + 1:
                continue  # not a block of ours still waiting in that buffer: the apply judges it
            npages = q[w + S["npages"]]
            charge = max(npages, least)
            if charge > room:
                continue
            room -= charge
            entries.append(e)
            offs += (lay.gmap_off + L.handle_index(h)[0], lay.amap_byte(h))
            values += (L.next_handle(h) & L.GEN_MASK, L.LISTED)
            pages += npages
            out.append((L.next_handle(h), npages))
        if out:
            tb_w = self.hw + H["large_taken_back"]
            op.wset(
                (*entries, rel_w, pages_w, tb_w),
                (*[0] * len(entries), q[rel_w] + len(out), q[pages_w] + pages, q[tb_w] + len(out)),
            )
            op.wscatter(offs, values)
        return out

    def collect_pending(self, op, k, room=0, least=0, keep_pages=0, keep_spans=0, want=0):
        """P k takes back the spans other Ps freed (PENDING), those of `want` pages first, newest
        first: as many as `room` pages allow (each charged at least `least`) become LISTED, for its large cache (counted
        live again, and as a malloc to come, as a local free counts them).  Of the rest, up to
        `keep_spans` spans and `keep_pages` pages stay PENDING for its next large slow paths; the
        others go back to the heap, the oldest first.  Returns ([(handle, pages) relisted],
        [handles given back]).  Checkpoints after each span: call it before anything else in the
        operation.  A producer whose blocks a consumer frees so allocates them again without a
        lock, as it would have had it freed them itself, and without the page heap."""
        op.need(L.LOCK_HEAP, "LargeObjects.collect_pending")
        q, kept, gone = self.q, [], []
        sw = self.lay.slot_word(k)
        if not q[sw + SL["lg_pending"]]:
            return kept, gone
        hw, lay, pend_w, head_w = self.hw, self.lay, self.pend_w(k), self.head_w(k)
        idxs = [
            hw + H["large_live"],
            hw + H["large_live_pages"],
            hw + H["large_mallocs"],
            hw + H["large_total_bytes"],
            sw + SL["lg_pending"],
            sw + SL["lg_pend_pages"],
        ]
        # Spans of the size the P wants first, newest first; then the others.  The list is walked
        # from its head only as far as `room` may still take a span (each is charged `least` at
        # least): a producer's pending list holds a window's worth, and it takes a few.
        for wanted in (True, False):
            r = q[pend_w] - 1
            while r >= 0 and room >= max(least, 1):
                w = lay.span_word(r)
                nxt, npages = q[w + S["next"]] - 1, q[w + S["npages"]]
                charge = max(npages, least)
                if (npages == want) == wanted and charge <= room:
                    room -= charge
                    h = self.base(r)
                    if self.mv[lay.amap_byte(h)] != L.PENDING:
                        raise CorruptionError(f"large span {r} on P {k}'s pending list is not PENDING")
                    op.wbyte(lay.amap_byte(h), L.LISTED)
                    deltas = (1, npages, 1, npages * PAGE, -1, -npages)
                    values = [q[i] + d for i, d in zip(idxs, deltas)]
                    self.heap.list_move(op, pend_w, head_w, r, L.LIST_LARGE, idxs, values)
                    kept.append((h, npages))
                    op.log.clear()  # checkpoint: any number of spans, a bounded undo log
                elif wanted and npages == want:
                    break  # the size wanted no longer fits: nor will the next of that size
                r = nxt
        # Too many left waiting: the oldest go back to the heap.
        if q[sw + SL["lg_pending"]] > keep_spans or q[sw + SL["lg_pend_pages"]] > keep_pages:
            for r in reversed(self.pending(k)):
                if q[sw + SL["lg_pending"]] <= keep_spans and q[sw + SL["lg_pend_pages"]] <= keep_pages:
                    break
                h = self.base(r)
                self._give_back(op, r, h, was_live=False)
                gone.append(h)
                op.log.clear()  # checkpoint
        return kept, gone

    def flush(self, op, k, disown=True):
        """Flush P k's large cache (Go: the pageCache flush): fold its optimistic mallocs into the
        heap figures and give back every span it keeps LISTED.  `disown` (the P is leaving or
        dead): also give back the spans other Ps freed (PENDING) and disown the spans still
        allocated; a snapshot leaves both with the P -- the figures count the first freed and
        the others live either way, and the P takes them back without a lock later.
        Checkpoints after each span.  Returns the spans handled."""
        op.need(L.LOCK_HEAP, "LargeObjects.flush")
        q, mv, lay, sw = self.q, self.mv, self.lay, self.lay.slot_word(k)
        rel_w, pages_w = sw + SL["lg_relists"], sw + SL["lg_relist_pages"]
        rel, rel_pages = q[rel_w], q[pages_w]
        if rel or rel_pages:
            mal, total = self.hw + H["large_mallocs"], self.hw + H["large_total_bytes"]
            op.wset((mal, total, rel_w, pages_w), (q[mal] + rel, q[total] + rel_pages * PAGE, 0, 0))
            op.log.clear()  # checkpoint
        n, mine, start = 0, L.TAG0 + k, S["start"]
        # A snapshot (not `disown`) leaves the pending list alone: no work per span on it.
        for r in self.owned(k) if disown else self._list(self.head_w(k)):
            b = mv[lay.amap_off + lay.span_index(q[lay.span_word(r) + start], 0)[0]]
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
            elif b == L.PENDING:  # freed already, in the figures too; on the pending list
                self._give_back(op, r, h, was_live=False)
            else:
                raise CorruptionError(f"large span {r} on P {k}'s list has object byte {b}")
            op.log.clear()  # checkpoint
            n += 1
        return n

    # --- the structure's own check (Arena.check_all) -------------------------------------------
    def check(self, records):
        """Every in-use large span's start byte agrees with its owner and list: an unowned one is
        ALLOC, one owned by P k is TAG(k), LISTED or PENDING on P k's list; RFREED only while a
        P's remote-free buffer holds it (`records`: PageHeap.span_records()).  Returns the
        problems."""
        arena = self.arena
        q, lay, bad = self.q, self.lay, []
        buffered = {
            L.handle_index(h)[0] for k in arena.registry.claimed() for h in arena.buffered_frees(k) if h
        }
        lists: dict = {}

        def on_list(k, pending):
            """The records on P k's pending list (`pending`) or its list of the others."""
            if (k, pending) not in lists:
                lists[k, pending] = set(self.pending(k) if pending else self._list(self.head_w(k)))
            return lists[k, pending]

        for k in arena.registry.claimed():
            sw, pend = lay.slot_word(k), self.pending(k)
            pages = sum(q[lay.span_word(r) + S["npages"]] for r in pend)
            if (q[sw + SL["lg_pending"]], q[sw + SL["lg_pend_pages"]]) != (len(pend), pages):
                bad.append(
                    f"P {k}: lg_pending {q[sw + SL['lg_pending']]}, lg_pend_pages "
                    f"{q[sw + SL['lg_pend_pages']]}, but its pending list holds {len(pend)} spans of {pages} pages"
                )
        for rec in records:
            if rec["state"] != L.SPAN_INUSE or rec["sizeclass"] != 0:
                continue
            j = lay.span_index(rec["start"], 0)[0]
            b0 = self.mv[lay.amap_off + j]
            k = rec["owner"] - 1
            if b0 == L.RFREED and j not in buffered:
                bad.append(f"large span {rec['r']} is RFREED but in no P's remote-free buffer")
            if k < 0 and (b0 not in (L.ALLOC, L.RFREED) or rec["list"] != L.LIST_NONE):
                bad.append(
                    f"large span {rec['r']}: start byte {b0}, list {rec['list']}; an unowned one is ALLOC"
                )
            elif k >= 0 and (
                b0 not in (L.TAG0 + k, L.LISTED, L.PENDING, L.RFREED)
                or rec["list"] != (L.LIST_LPENDING if b0 == L.PENDING else L.LIST_LARGE)
                or rec["r"] not in on_list(k, b0 == L.PENDING)
            ):
                bad.append(
                    f"large span {rec['r']} owned by P {k}: start byte {b0}, list {rec['list']}, "
                    "want TAG(k) or LISTED on P k's list, PENDING on its pending list"
                )
        return bad
