"""PageHeap: pages, spans and the page->span map (Go's mheap).  See shm/__init__.py for an overview.

The heap is `heap_max` bytes at `heap_off` in the segment, reserved sparse.  Pages [0, committed)
are committed with os.posix_fallocate, which fails with ENOSPC on a full tmpfs -- a clean
OutOfMemory -- where touching an uncommitted page of a full tmpfs, even to read it, would kill the
process with SIGBUS.  A commit reserves the pages together with every table entry that describes
them (allocation map, generation map, page map: Layout.page_tables), before anything is written.
The span table is reserved by use instead: records [0, records_high) lie in reserved OS pages,
and an operation that may raise records_high into a new page reserves it first
(reserve_records) -- a heap of a few large spans holds a few pages of records, whatever its
size.
A span allocation commits its range again only when its pages were released (MADV_REMOVE, which
gives back the allocation-map pages that describe only them too): committed_pages is a high-water
mark, and pages below it are committed unless their free span says `released`, so no code path
touches a page tmpfs has not promised, and none pays for fallocate twice.  (A span marked
released may still hold some of its pages -- a release cut short by a crash, a merge with no room
to commit -- which costs memory, never safety.)

Free spans live in size buckets (bucket n holds free spans of n pages, n < 128; bucket 128 holds
the rest), doubly linked through their records.  The unreleased ones are also on the idle list,
oldest first (freed_ns), which the scavenger releases from: a bounded step at a time
(`scavenge`), the world running.  Free neighbours coalesce when both are released or both are
not; a run of mixed ones is merged only for an allocation that fits nowhere else.  The page map holds record index+1 for every page
of a small-object span, and for the first and last page of a large object's span and of a free
span (enough to find a large object from its handle, and to coalesce).

Every method runs inside an Op that holds the heap lock (checked), and writes through it.
"""

import errno
import mmap
import os
import time

from . import layout as L
from .errors import CorruptionError, OutOfMemory

S = L.SPAN
H = L.HEAP
_SW, _NEXT, _PREV, _LIST = L.SPAN_WORDS, S["next"], S["prev"], S["list"]
PAGE = L.PAGE_SIZE
GROW_PAGES = 128  # commit at least 1 MiB at a time


def reserve(fd, ranges, what, remedy="free space in /dev/shm or lower --max-heap"):
    """posix_fallocate every (offset, bytes) of `ranges` in the segment open as `fd`, so that tmpfs
    has promised their pages before anyone touches them: a write -- or a read -- of an unpromised
    page of a full tmpfs is SIGBUS.  OutOfMemory naming `what` and `remedy` when /dev/shm is
    full."""
    for off, n in ranges:
        try:
            os.posix_fallocate(fd, off, n)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise OutOfMemory(
                    f"/dev/shm is full: cannot commit {what} ({os.strerror(e.errno)}); {remedy}"
                ) from None
            raise


class PageHeap:
    def __init__(self, arena):
        self.arena = arena
        self.q = arena.q
        self.lay = arena.lay
        self.hw = arena.lay.heap_word()
        self.pm = arena.lay.pagemap_word()
        self.s0 = arena.lay.span_word(0)  # span r's first word: s0 + r * SPAN_WORDS

    # --- small accessors ----------------------------------------------------------------
    def sw(self, r):
        return self.s0 + r * _SW

    def field(self, r, name):
        return self.q[self.lay.span_word(r) + S[name]]

    def hget(self, name):
        return self.q[self.hw + H[name]]

    def span_of_page(self, page):
        """Record index of the in-use span holding `page`, or -1.  No lock: a hint that the
        caller re-validates under the span's lock."""
        if not 0 <= page < self.q[self.hw + H["committed_pages"]]:
            return -1  # no entry past the committed heap is reserved: reading it could SIGBUS
        r = self.q[self.pm + page] - 1
        if r < 0:
            return -1
        w = self.lay.span_word(r)
        q = self.q
        if (
            q[w + S["state"]] != L.SPAN_INUSE
            or not q[w + S["start"]] <= page < q[w + S["start"]] + q[w + S["npages"]]
        ):
            return -1
        return r

    # --- intrusive doubly linked lists through span records ------------------------------------
    def list_push(self, op, head_w, r, tag, idxs=(), values=()):
        """Push span r on the list at `head_w`.  The caller's own writes `idxs`, `values` (words
        the push neither reads nor writes) go with the push's in one logged step (Op.wset)."""
        op.wset(*self.list_push_words(head_w, r, tag, idxs, values))

    def list_push_words(self, head_w, r, tag, idxs=(), values=()):
        """(word indices, values) of list_push(head_w, r, tag), to be written in one step."""
        s0 = self.s0
        w = s0 + r * _SW
        first = self.q[head_w]
        idxs = [*idxs, w + _NEXT, w + _PREV, w + _LIST, head_w]
        values = [*values, first, 0, tag, r + 1]
        if first:
            idxs.append(s0 + (first - 1) * _SW + _PREV)
            values.append(r + 1)
        return idxs, values

    def list_move(self, op, from_w, to_w, r, tag, idxs=(), values=()):
        """Move span r from the list at `from_w` to the one at `to_w` (another list) in one step:
        list_remove's words, then list_push's, whose values for r's own links win (Op.wset writes
        in order); the caller's `idxs`, `values` go with them."""
        idxs, values = self.list_remove_words(from_w, r, idxs, values)
        op.wset(*self.list_push_words(to_w, r, tag, idxs, values))

    def list_remove(self, op, head_w, r, idxs=(), values=()):
        """Take span r off the list at `head_w`; the caller's own writes `idxs`, `values` go with
        it in one step, as in list_push."""
        op.wset(*self.list_remove_words(head_w, r, idxs, values))

    def list_remove_words(self, head_w, r, idxs=(), values=()):
        """(word indices, values) of list_remove(head_w, r), to be written in one step."""
        q, s0 = self.q, self.s0
        w = s0 + r * _SW
        nxt, prv = q[w + _NEXT], q[w + _PREV]
        idxs = [*idxs, w + _NEXT, w + _PREV, w + _LIST]
        values = [*values, 0, 0, L.LIST_NONE]
        if prv:
            idxs.append(s0 + (prv - 1) * _SW + _NEXT)
        else:
            if q[head_w] != r + 1:
                raise CorruptionError(f"span {r} is not at the head of its list but has no prev")
            idxs.append(head_w)
        values.append(nxt)
        if nxt:
            idxs.append(s0 + (nxt - 1) * _SW + _PREV)
            values.append(prv)
        return idxs, values

    def bucket_w(self, npages):
        return self.hw + L.HEAP_BUCKETS_AT + min(npages, L.NBUCKETS - 1)

    # --- span records -------------------------------------------------------------------
    def reserve_records(self, n):
        """Reserve the span table's OS pages up to record records_high + n - 1 (at most
        nrecords; less the UNUSED records waiting in free_record), so that the next n records
        new_record takes lie in reserved pages.  No
        system call unless they reach past the pages records [0, records_high) hold (the
        reserved high-water mark, derived: HEAP records_high).  Called before the operation
        that may take them writes anything, so a full /dev/shm is OutOfMemory with the heap
        unchanged; the pages are never given back."""
        lay, q = self.lay, self.q
        r = q[self.hw + H["free_record"]]
        while r and n:  # an UNUSED record below records_high is taken first
            n -= 1
            r = q[self.sw(r - 1) + S["next"]]
        high = q[self.hw + H["records_high"]]
        want = min(high + n, lay.nrecords)
        have = max(lay.record_pages(high)[1], self._records_reserved)
        off, size = lay.record_pages(want)
        if size > have:
            reserve(self.arena.fd, [(off + have, size - have)], f"{size - have} bytes of span records")
            self._records_reserved = size  # this process's note: the derived mark may lag it

    _records_reserved = 0  # bytes of the span table this process reserved past the derived mark

    def new_record(self, op):
        q, hw = self.q, self.hw
        r = q[hw + H["free_record"]] - 1
        if r >= 0:
            op.w(hw + H["free_record"], q[self.sw(r) + S["next"]])
        else:
            r = q[hw + H["records_high"]]
            if r >= self.lay.nrecords:
                raise CorruptionError("span table exhausted (more spans than pages)")
            # The callers reserved it before writing (reserve_records): a no-op then.  Should one
            # not have, an OutOfMemory here still rolls the whole operation back.
            self.reserve_records(1)
            op.w(hw + H["records_high"], r + 1)
        w = self.sw(r)
        for name in (
            "next",
            "prev",
            "list",
            "owner",
            "alloc_count",
            "npending",
            "released",
            "sizeclass",
            "nelems",
            "idle_next",
            "idle_prev",
            "freed_ns",
        ):
            op.w(w + S[name], 0)
        op.add(hw + H["nrecords_used"], 1)
        return r

    def drop_record(self, op, r):
        op.wset(*self._drop_record_words(r))

    def _drop_record_words(self, r):
        """(word indices, values) of drop_record(r), to be written in one step."""
        q, w, hw = self.q, self.sw(r), self.hw
        fr, used = hw + H["free_record"], hw + H["nrecords_used"]
        return [w + S["state"], w + S["list"], w + S["next"], fr, used], [
            L.SPAN_UNUSED,
            L.LIST_UNUSED,
            q[fr],
            r + 1,
            q[used] - 1,
        ]

    def set_pagemap(self, op, start, npages, value, ends_only=False):
        if ends_only:
            op.w(self.pm + start, value)
            op.w(self.pm + start + npages - 1, value)
        else:
            op.wwords(self.pm + start, [value] * npages)

    # --- the idle list: unreleased free spans, oldest first (the scavenger's order) -----------
    def idle_push(self, op, r):
        """Append FREE, unreleased span r to the idle list as freed now."""
        op.wset(*self._idle_push_words(r))

    def _idle_push_words(self, r):
        """(word indices, values) of idle_push(r), to be written in one step."""
        q, w, tail_w = self.q, self.sw(r), self.hw + H["idle_tail"]
        last = q[tail_w]
        link = (self.sw(last - 1) + S["idle_next"]) if last else self.hw + H["idle_head"]
        return (
            (w + S["freed_ns"], w + S["idle_prev"], w + S["idle_next"], link, tail_w),
            (time.monotonic_ns(), last, 0, r + 1, r + 1),
        )

    def idle_remove(self, op, r, put=None):
        """Take span r off the idle list; `put` (a record) takes its place and its age."""
        op.wset(*self._idle_remove_words(r, put))

    def _idle_remove_words(self, r, put=None):
        """(word indices, values) of idle_remove(r, put), to be written in one step."""
        q, w = self.q, self.sw(r)
        nxt, prv = q[w + S["idle_next"]], q[w + S["idle_prev"]]
        before, after = nxt, prv  # what the neighbours link to instead of r
        idxs, values = [], []
        if put is not None:
            pw = self.sw(put)
            idxs = [pw + S["idle_next"], pw + S["idle_prev"], pw + S["freed_ns"]]
            values = [nxt, prv, q[w + S["freed_ns"]]]
            before = after = put + 1
        idxs += (
            (self.sw(prv - 1) + S["idle_next"]) if prv else self.hw + H["idle_head"],
            (self.sw(nxt - 1) + S["idle_prev"]) if nxt else self.hw + H["idle_tail"],
            w + S["idle_next"],
            w + S["idle_prev"],
        )
        values += (before, after, 0, 0)
        return idxs, values

    def _take_free(self, op, r, drop=False):
        """Take FREE span r off its bucket and, if unreleased, the idle list; with `drop`, drop
        its record too.  One step: the words of each part are distinct but for r's own list
        links, which the drop writes last."""
        w = self.sw(r)
        idxs, values = self.list_remove_words(self.bucket_w(self.q[w + S["npages"]]), r)
        if not self.q[w + S["released"]]:
            more = self._idle_remove_words(r)
            idxs += more[0]
            values += more[1]
        if drop:
            more = self._drop_record_words(r)
            idxs += more[0]
            values += more[1]
        op.wset(idxs, values)

    # --- free spans ---------------------------------------------------------------------
    def _free_neighbour(self, start, npages, side, r=-1):
        """The FREE span just before (side -1) or after (+1) pages [start, start+npages), or -1."""
        q = self.q
        p = start - 1 if side < 0 else start + npages
        if not 0 <= p < q[self.hw + H["committed_pages"]]:
            return -1
        n = q[self.pm + p] - 1
        if n < 0 or n == r:
            return -1
        nw = self.sw(n)
        ns, nn = q[nw + S["start"]], q[nw + S["npages"]]
        if q[nw + S["state"]] != L.SPAN_FREE:
            return -1
        if not ((side < 0 and ns + nn == start) or (side > 0 and ns == start + npages)):
            return -1
        return n

    def _insert_free(self, op, r, released=None, idxs=(), values=()):
        """Make record r (start, npages, released set) a FREE span, coalescing neighbours of the
        same released state.  A released and an unreleased span stay apart: merging them would
        commit the released pages again (or release pages just freed), undoing the scavenger's
        work or the freer's; alloc_span merges such a run only when nothing else fits.
        `released`: the value r's `released` is to take (None: the one it has).  The caller's
        own writes `idxs`, `values` (words this neither reads nor writes otherwise) go with the
        last step's, in one entry."""
        q = self.q
        w = self.sw(r)
        start, npages = q[w + S["start"]], q[w + S["npages"]]
        if released is None:
            released = q[w + S["released"]]
        for side in (-1, +1):
            n = self._free_neighbour(start, npages, side, r)
            if n < 0 or q[self.sw(n) + S["released"]] != released:
                continue
            ns, nn = q[self.sw(n) + S["start"]], q[self.sw(n) + S["npages"]]
            self._take_free(op, n, drop=True)
            start, npages = min(start, ns), npages + nn
        # r's fields, its page-map ends, its bucket and the idle list: one step, one entry.
        idxs = (
            *idxs,
            w + S["start"],
            w + S["npages"],
            w + S["state"],
            w + S["sizeclass"],
            w + S["released"],
            self.pm + start,
            self.pm + start + npages - 1,
        )
        values = (*values, start, npages, L.SPAN_FREE, 0, released, r + 1, r + 1)
        if released:
            idxs, values = (*idxs, w + S["freed_ns"]), (*values, time.monotonic_ns())
        else:
            more = self._idle_push_words(r)
            idxs, values = (*idxs, *more[0]), (*values, *more[1])
        self.list_push(op, self.bucket_w(npages), r, L.LIST_HEAPFREE, idxs, values)

    MERGE_PIECES = 64  # at most this many free spans merged for one allocation (undo log room)

    def _merge_run(self, op, npages):
        """Merge a run of adjacent free spans, released and not, that holds `npages` pages into
        one unreleased span (committing its released pages again): the allocation that found
        no single span large enough then needs no growth.  Returns False when no run is long
        enough.  Only on that path, before growing: it walks every free span."""
        q = self.q
        for b in range(1, L.NBUCKETS):
            f = q[self.hw + L.HEAP_BUCKETS_AT + b] - 1
            while f >= 0:
                fw = self.sw(f)
                start, total = q[fw + S["start"]], q[fw + S["npages"]]
                run = [f]
                if self._free_neighbour(start, total, -1) < 0:  # f starts a run
                    while total < npages and len(run) < self.MERGE_PIECES:
                        n = self._free_neighbour(start, total, +1)
                        if n < 0:
                            break
                        run.append(n)
                        total += q[self.sw(n) + S["npages"]]
                    if total >= npages:
                        for n in run:
                            nw = self.sw(n)
                            if q[nw + S["released"]]:
                                self._commit(q[nw + S["start"]], q[nw + S["npages"]])
                                op.add(self.hw + H["released_pages"], -q[nw + S["npages"]])
                            self._take_free(op, n, drop=n != f)
                        op.w(fw + S["npages"], total)
                        op.w(fw + S["released"], 0)
                        self._insert_free(op, f)
                        return True
                f = q[fw + S["next"]] - 1
        return False

    def _find_free(self, npages):
        q = self.q
        for b in range(min(npages, L.NBUCKETS - 1), L.NBUCKETS - 1):
            head = q[self.hw + L.HEAP_BUCKETS_AT + b]
            if head:
                return head - 1
        best, r = -1, q[self.hw + L.HEAP_BUCKETS_AT + L.NBUCKETS - 1] - 1
        while r >= 0:  # bucket 128: best fit, then lowest address
            n = q[self.sw(r) + S["npages"]]
            if n >= npages and (
                best < 0
                or (n, q[self.sw(r) + S["start"]])
                < (q[self.sw(best) + S["npages"]], q[self.sw(best) + S["start"]])
            ):
                best = r
            r = q[self.sw(r) + S["next"]] - 1
        return best

    def _commit(self, start, npages, grow=False):
        """Reserve heap pages [start, start + npages) and the table entries that describe them
        before anything touches them: every table's when the pages raise the high-water mark
        (`grow`), else -- released pages committed again -- those of the tables given back with
        them (Layout.page_tables).  OutOfMemory when /dev/shm is full, with nothing written;
        a range reserved before the failure is only ever trusted once a later call commits it
        again."""
        lay = self.lay
        reserve(
            self.arena.fd,
            lay.page_meta(start, npages, released=not grow) + [(lay.heap_off + start * PAGE, npages * PAGE)],
            f"{npages * PAGE} bytes of heap",
        )
        if not grow:
            # The generation map of released pages read zero, the first generation an address
            # ever hands out: a handle from before the release would match again.  One byte that
            # changes with every release (never 0) over the whole range instead.  No undo entry:
            # the pages are free and nobody's, and any value is a valid generation there.
            n = npages * L.COARSE_PER_PAGE
            a = lay.gmap_off + lay.fine_bytes + start * L.COARSE_PER_PAGE
            self.arena.mv[a : a + n] = bytes((self._epoch_gen(),)) * n

    def _epoch_gen(self):
        """The generation written over map entries reserved again after a release: one value
        that changes with every release, never 0."""
        return 1 + self.q[self.hw + H["releases"]] % L.GEN_MASK

    def _reserve_fine(self, op, start, npages):
        """Reserve the fine-map OS pages (both maps) over heap pages [start, start + npages), for a
        span of a fine class, before anything touches them; OutOfMemory, nothing changed, when
        /dev/shm is full.  A page reserved afresh may have been given back since a fine handle
        of it was made (its bytes read 0, most handles' first generation), so once anything was
        ever released the release epoch's generation is written over its generation bytes
        before its flag is set: the flag (logged) says the page is reserved and its bytes
        valid.  A crash in between leaves the flag clear and the work done again next time."""
        lay, mv = self.lay, self.arena.mv
        pages = lay.fine_pages(start, npages)
        flags = lay.finemap_flags
        old = bytes(mv[flags + pages.start : flags + pages.stop])
        if all(old):
            return
        fresh = [p for p, f in zip(pages, old) if not f]  # a few: a fine span is at most 3 pages
        reserve(
            self.arena.fd,
            [r for p in fresh for r in lay.fine_ranges(range(p, p + 1))],
            f"{len(fresh) * 2 * L.OS_PAGE} bytes of allocation and generation map",
        )
        if self.q[self.hw + H["releases"]]:
            self._regenerate_fine(fresh)
        op.wbytes(flags + pages.start, 1, b"\x01" * len(old), old)
        op.add(self.hw + H["fine_map_pages"], len(fresh))

    def _regenerate_fine(self, pages):
        """Write the release epoch's generation over the fine generation bytes of fine-map OS
        pages `pages` (not over the coarse bytes the last one may hold).  No undo entry: no span
        of a fine class lies there, and any value is a valid generation."""
        lay, mv = self.lay, self.arena.mv
        g = bytes((self._epoch_gen(),)) * L.OS_PAGE
        for p in pages:
            a = lay.gmap_off + p * L.OS_PAGE
            n = min(L.OS_PAGE, lay.fine_bytes - p * L.OS_PAGE)
            mv[a : a + n] = g[:n]

    FORGET_CHUNK = 4096  # fine-map flags cleared per checkpoint (a 4 KiB undo entry)

    def _forget_fine(self, op, start, npages, piece=None):
        """Clear the fine-map flags of the OS pages a release of heap pages [start, start +
        npages) gives back -- with `piece`, of those that describe a page of it
        (Layout.released_meta) -- and checkpoint: the caller's writes go with
        the first chunk of flags, each later chunk is a checkpoint of its own (a flag cleared
        over a page not yet given back only makes the next fine span reserve it again), so the
        undo log stays bounded however long the release."""
        pages = self.lay.released_fine(start, npages, piece)
        flags = self.lay.finemap_flags
        for lo in range(pages.start, pages.stop, self.FORGET_CHUNK):
            hi = min(lo + self.FORGET_CHUNK, pages.stop)
            old = bytes(self.arena.mv[flags + lo : flags + hi])
            if any(old):
                op.wbytes(flags + lo, 1, bytes(len(old)), old)
                op.add(self.hw + H["fine_map_pages"], -sum(old))
            op.log.clear()  # checkpoint
        op.log.clear()  # checkpoint (a release with no fine-map page wholly inside it)

    def _punch(self, start, npages, span=None):
        """Give heap pages [start, start + npages) back to the OS (MADV_REMOVE punches them out of
        tmpfs), with the OS pages of table entries that describe only released pages: those of
        `span` (start, npages: the released span they are part of; by default just them) that
        describe one of them (Layout.released_meta).  The caller has marked them released and
        checkpointed first."""
        mm = self.arena.mmap
        span = span or (start, npages)
        meta = self.lay.released_meta(*span, piece=(start, npages))
        for off, nbytes in [(self.lay.heap_off + start * PAGE, npages * PAGE), *meta]:
            mm.madvise(mmap.MADV_REMOVE, off, nbytes)

    def grow(self, op, npages):
        """Commit at least `npages` more pages at the end of the heap (Go's mheap.grow)."""
        op.need(L.LOCK_HEAP, "PageHeap.grow")
        q, hw = self.q, self.hw
        committed = q[hw + H["committed_pages"]]
        room = self.lay.heap_pages - committed
        if npages > room:
            raise OutOfMemory(
                f"heap exhausted: need {npages} pages, {room} of {self.lay.heap_pages} "
                f"left to commit (--max-heap {self.lay.heap_max} bytes)"
            )
        n = min(room, max(npages, GROW_PAGES))
        self._commit(committed, n, grow=True)
        op.w(hw + H["committed_pages"], committed + n)
        op.add(hw + H["grows"], 1)
        r = self.new_record(op)
        w = self.sw(r)
        op.w(w + S["start"], committed)
        op.w(w + S["npages"], n)
        self._insert_free(op, r)

    # --- the span interface (Go: mheap.alloc / mheap.freeSpan) ------------------------------
    def alloc_span(self, op, npages, sizeclass, nelems):
        """An INUSE span of `npages` pages for `sizeclass` (0 = one large object)."""
        op.need(L.LOCK_HEAP, "PageHeap.alloc_span")
        if npages <= 0:
            raise CorruptionError(f"alloc_span of {npages} pages")
        f = self._find_free(npages)
        # The records this may take -- a growth's, the rest of a split -- reserved before anything
        # is written: a full /dev/shm is OutOfMemory here, the heap untouched.
        self.reserve_records(2 if f < 0 else int(self.q[self.sw(f) + S["npages"]] > npages))
        if f < 0 and self._merge_run(op, npages):
            f = self._find_free(npages)
        if f < 0:
            self.grow(op, npages)
            f = self._find_free(npages)
            if f < 0:
                raise CorruptionError(f"heap grew by {npages} pages but has no free span that large")
        q, hw = self.q, self.hw
        fw = self.sw(f)
        fstart, fn, frel = q[fw + S["start"]], q[fw + S["npages"]], q[fw + S["released"]]
        if sizeclass and not L.CLASS_COARSE[sizeclass]:
            self._reserve_fine(op, fstart, npages)
        if frel:
            # Pages of a free span that was never released are committed already (they lie below
            # committed_pages): only released ones are committed again.
            self._commit(fstart, npages)
        self.list_remove(op, self.bucket_w(fn), f)
        rest = None
        if fn > npages:
            rest = self.new_record(op)
            rw = self.sw(rest)
            op.w(rw + S["start"], fstart + npages)
            op.w(rw + S["npages"], fn - npages)
            op.w(rw + S["state"], L.SPAN_FREE)
            op.w(rw + S["released"], frel)
            self.set_pagemap(op, fstart + npages, fn - npages, rest + 1, ends_only=True)
            self.list_push(op, self.bucket_w(fn - npages), rest, L.LIST_HEAPFREE)
        if not frel:
            self.idle_remove(op, f, put=rest)  # the rest keeps the span's age and place
        if frel:
            op.add(hw + H["released_pages"], -npages)
        op.w(fw + S["npages"], npages)
        op.w(fw + S["state"], L.SPAN_INUSE)
        op.w(fw + S["sizeclass"], sizeclass)
        op.w(fw + S["nelems"], nelems)
        op.w(fw + S["released"], 0)
        op.w(fw + S["alloc_count"], 0)
        op.w(fw + S["npending"], 0)
        op.w(fw + S["owner"], 0)
        # Every page of a small-object span maps to it (a free finds its span from any object);
        # a large object is found from its first page, so only its ends are mapped -- an undo
        # log of every page of a 1 GiB span would not fit.
        self.set_pagemap(op, fstart, npages, f + 1, ends_only=sizeclass == 0)
        op.add(hw + H["inuse_pages"], npages)
        return f

    def free_span(self, op, r):
        """Return INUSE span r to the free buckets, coalescing (Go: mheap.freeSpan)."""
        op.need(L.LOCK_HEAP, "PageHeap.free_span")
        q, w = self.q, self.sw(r)
        if q[w + S["state"]] != L.SPAN_INUSE:
            raise CorruptionError(f"free_span of span {r} in state {q[w + S['state']]}")
        if q[w + S["list"]] != L.LIST_NONE or q[w + S["owner"]]:
            raise CorruptionError(f"free_span of span {r} still on a list or cached")
        inuse = self.hw + H["inuse_pages"]
        # Interior page-map entries may keep pointing at r: lookups check state and range.
        self._insert_free(op, r, 0, (inuse, w + S["nelems"]), (q[inuse] - q[w + S["npages"]], 0))

    def scavenge(self, op, max_pages, keep_pages=0, max_spans=8, background=False, freed_before=None):
        """One bounded step of giving idle pages back to the OS (MADV_REMOVE punches them out
        of tmpfs; Go: the background scavenger, and debug.FreeOSMemory when repeated with
        keep_pages 0).  Releases at most `max_pages` pages from at most `max_spans` free spans,
        the ones idle longest first (the idle list), and leaves `keep_pages` idle pages
        committed.  A span longer than the budget is split: its tail is released, its head
        keeps its place and its age.  With `freed_before` (a time.monotonic_ns()), only spans
        freed before it: a span freed a moment ago is likely to be taken again at once (a
        producer and a consumer passing blocks of one size), and releasing it would make that
        allocation commit, fault in and zero its pages again.  Returns the pages released.  A
        split needs a span record: when /dev/shm has no room for the page of records it would
        reach, the step stops there (giving memory back never fails for want of memory).

        Each span is marked released and checkpointed BEFORE its madvise: a crash in between
        leaves pages marked released that are still there (harmless: they are committed again
        on use), never pages gone from tmpfs that the heap believes committed."""
        op.need(L.LOCK_HEAP, "PageHeap.scavenge")
        q, hw = self.q, self.hw
        idle = q[hw + H["committed_pages"]] - q[hw + H["inuse_pages"]] - q[hw + H["released_pages"]]
        budget, done = min(max_pages, idle - keep_pages), 0
        for _ in range(max_spans):
            r = q[hw + H["idle_head"]] - 1
            if budget <= 0 or r < 0:
                break
            w = self.sw(r)
            if freed_before is not None and q[w + S["freed_ns"]] > freed_before:
                break  # the oldest is too young: so is every span after it
            start, n = q[w + S["start"]], q[w + S["npages"]]
            k = min(n, budget)
            if k < n:  # a split takes a record: reserved first, or no split on a full /dev/shm
                try:
                    self.reserve_records(1)
                except OutOfMemory:
                    break
            self.list_remove(op, self.bucket_w(n), r)
            if k == n:  # the whole span
                self.idle_remove(op, r)
                t = r
            else:  # its tail: r keeps the head, its place in the idle list and its age
                op.w(w + S["npages"], n - k)
                self.set_pagemap(op, start, n - k, r + 1, ends_only=True)
                self.list_push(op, self.bucket_w(n - k), r, L.LIST_HEAPFREE)
                t = self.new_record(op)
                op.w(self.sw(t) + S["start"], start + n - k)
                op.w(self.sw(t) + S["npages"], k)
            op.w(self.sw(t) + S["released"], 1)
            self._insert_free(op, t)  # joins a released neighbour
            joined = (q[self.sw(t) + S["start"]], q[self.sw(t) + S["npages"]])
            op.add(hw + H["released_pages"], k)
            op.add(hw + H["released_total"], k)
            op.add(hw + H["releases"], 1)
            if background:
                op.add(hw + H["scavenged_pages"], k)
            # The maps' OS pages across the piece's ends go too when the join makes them
            # describe released pages only.
            self._forget_fine(op, *joined, piece=(start + n - k, k))  # and checkpoint
            self._punch(start + n - k, k, span=joined)
            budget -= k
            done += k
        return done

    # --- the structure's own check (Arena.check_all) -------------------------------------------
    def span_records(self):
        """Every FREE or INUSE record as a dict, ascending by start page (the checks' and the
        slow figures' one walk of the span table)."""
        q, lay = self.q, self.lay
        high = q[self.hw + H["records_high"]]
        out = []
        for r in range(high):
            w = lay.span_word(r)
            st = q[w + S["state"]]
            if st in (L.SPAN_FREE, L.SPAN_INUSE):
                d = {k: q[w + i] for k, i in S.items()}
                d["r"] = r
                out.append(d)
        out.sort(key=lambda d: d["start"])
        return out

    def check(self, records):
        """Spans tile [0, committed) with free neighbours coalesced; page map, counters and free
        buckets agree with the span table (`records`: span_records()).  Returns the problems."""
        q, lay, bad = self.q, self.lay, []
        hw = self.hw
        committed = q[hw + H["committed_pages"]]
        # The page heap tiles [0, committed) with FREE and INUSE spans, free neighbours coalesced.
        page = 0
        prev_free = None  # the released state of the previous span if it is free
        for rec in records:
            if rec["start"] != page:
                bad.append(f"span {rec['r']} starts at page {rec['start']}, expected {page} (gap or overlap)")
            page = rec["start"] + rec["npages"]
            free = rec["state"] == L.SPAN_FREE
            if free and prev_free == rec["released"]:
                bad.append(
                    f"free span {rec['r']} at page {rec['start']} was not coalesced with its predecessor"
                )
            prev_free = rec["released"] if free else None
            if rec["npages"] == 0:
                bad.append(f"span {rec['r']} has 0 pages")
        if page != committed:
            bad.append(f"spans cover {page} pages but {committed} are committed")
        pm = self.pm
        inuse_pages = 0
        for rec in records:
            r1 = rec["r"] + 1
            if rec["state"] == L.SPAN_INUSE:
                inuse_pages += rec["npages"]
                end = rec["start"] + rec["npages"]
                pages = range(rec["start"], end) if rec["sizeclass"] else (rec["start"], end - 1)
                for p in pages:
                    if q[pm + p] != r1:
                        bad.append(f"page map: page {p} of span {rec['r']} maps to {q[pm + p] - 1}")
                        break
            else:
                for p in (rec["start"], rec["start"] + rec["npages"] - 1):
                    if q[pm + p] != r1:
                        bad.append(f"page map: end page {p} of free span {rec['r']} maps to {q[pm + p] - 1}")
                want_list = L.LIST_HEAPFREE
                if rec["list"] != want_list:
                    bad.append(f"free span {rec['r']} is not on a heap free list")
        # The fine-map table: its count, and every fine span's fine-map pages reserved.
        flags = bytes(self.arena.mv[lay.finemap_flags : lay.finemap_flags + lay.fine_os_pages])
        if flags.count(1) != len(flags) - flags.count(0) or flags.count(1) != q[hw + H["fine_map_pages"]]:
            bad.append(
                f"fine-map table holds {flags.count(1)} flags (and {len(flags) - flags.count(0) - flags.count(1)} "
                f"bytes neither 0 nor 1), heap fine_map_pages says {q[hw + H['fine_map_pages']]}"
            )
        for rec in records:
            c = rec["sizeclass"]
            if rec["state"] == L.SPAN_INUSE and c and not L.CLASS_COARSE[c]:
                pages = lay.fine_pages(rec["start"], rec["npages"])
                if not all(flags[pages.start : pages.stop]):
                    bad.append(f"span {rec['r']} (class {c}) lies on fine-map pages not reserved ({pages})")
        if inuse_pages != q[hw + H["inuse_pages"]]:
            bad.append(f"heap inuse_pages {q[hw + H['inuse_pages']]} != pages of in-use spans {inuse_pages}")
        if q[hw + H["nrecords_used"]] != len(records):
            bad.append(f"heap nrecords_used {q[hw + H['nrecords_used']]} != records in use {len(records)}")
        # Free buckets: every FREE span exactly once, in the right bucket, links consistent.
        seen = set()
        for b in range(1, L.NBUCKETS):
            for r in self._walk(q[hw + L.HEAP_BUCKETS_AT + b], "next", "prev", f"free bucket {b}", seen, bad):
                w = lay.span_word(r)
                n = q[w + S["npages"]]
                if q[w + S["state"]] != L.SPAN_FREE or min(n, L.NBUCKETS - 1) != b:
                    bad.append(f"free bucket {b} holds span {r} (state {q[w + S['state']]}, {n} pages)")
        nfree = sum(1 for rec in records if rec["state"] == L.SPAN_FREE)
        if len(seen) != nfree:
            bad.append(f"free buckets hold {len(seen)} spans, {nfree} spans are free")
        return bad + self._check_idle(records)

    def _walk(self, head, nxt, prv, what, seen, bad):
        """The records of the list starting at `head` (record index + 1, linked through the span
        fields `nxt`/`prv`), each added to `seen`; a cycle or a wrong back link goes into `bad`."""
        q, r, prev = self.q, head - 1, -1
        while r >= 0:
            w = self.sw(r)
            if r in seen:
                bad.append(f"{what}: span {r} seen twice (cycle?)")
                return
            seen.add(r)
            if q[w + S[prv]] != prev + 1:
                bad.append(f"{what}: span {r} prev link {q[w + S[prv]] - 1} != {prev}")
            yield r
            prev, r = r, q[w + S[nxt]] - 1

    def _check_idle(self, records):
        """The idle list holds every unreleased FREE span once, oldest first, links consistent."""
        q, hw, bad = self.q, self.hw, []
        want = {rec["r"] for rec in records if rec["state"] == L.SPAN_FREE and not rec["released"]}
        seen, last, age = set(), -1, 0
        for r in self._walk(q[hw + H["idle_head"]], "idle_next", "idle_prev", "idle list", seen, bad):
            if r not in want:
                bad.append(f"idle list holds span {r}, which is not a free unreleased span")
            if q[self.sw(r) + S["freed_ns"]] < age:
                bad.append(f"idle list: span {r} is older than the span before it")
            age, last = q[self.sw(r) + S["freed_ns"]], r
        if q[hw + H["idle_tail"]] != last + 1:
            bad.append(f"idle list: tail {q[hw + H['idle_tail']] - 1} != last span {last}")
        if seen != want:
            bad.append(f"idle list misses free unreleased spans {sorted(want - seen)[:5]}")
        return bad
