"""Byte layout of the arena segment.  See shm/__init__.py for an overview.

The arena is ONE `multiprocessing.shared_memory` segment, reserved at its full size with
ftruncate (sparse on tmpfs: untouched pages cost nothing).  A page is committed with
posix_fallocate before anything touches it: the fixed regions (header to heap metadata, the
fine-map table, the daemon's and the registry's actor slots, and the span table's and page map's
preambles) when the arena is created; a worker's P slot, its undo log with it, when it is first
claimed (Registry.claim: slots [0, HDR slots_high) are the reserved ones, and only they are ever
read); the span table's OS pages as the records in use reach them (PageHeap.new_record: records
[0, records_high)); the heap's pages with their entries in the per-page tables
(Layout.page_tables) as the heap grows; and the OS pages of the maps' fine parts when a span of a
fine class is placed over them -- see PageHeap.  None of these is ever given back but the heap
pages and the tables released with them.  Every integer field is an unsigned
64-bit little-endian word, addressed as an index into a `memoryview.cast('Q')` of the whole
segment; only the allocation and generation maps are bytes.  Regions, in order, each starting on an 8 KiB
boundary:

    offset        region        contents
    0             header        HDR_* words: magic, version, sizes, the offset of every region
    lock_off      locks         REGION preamble, then per lock: dirty actor+1, dirty pid, its start
    central_off   central       REGION preamble, then per size class c (0..66): CENTRAL_* words
    heapmeta_off  heapmeta      REGION preamble, HEAP_* words, free-span bucket heads
    finemap_off   fine-map tab  REGION preamble, then a byte per OS page of the maps' fine part
                                (per 32 KiB of heap): 1 = that OS page of both maps is reserved
    slots_off     P slots       per slot (nslots workers, then the daemon's actor slot and the
                                registry's actor slot): SLOT_* words, then the undo log; a
                                worker's slot is reserved, and touched, from its first claim on
    spans_off     span table    REGION preamble, then nrecords records of SPAN_* words, the OS
                                pages under records [0, records_high) reserved
    pagemap_off   page map      REGION preamble, then one word per heap page: record index+1
    amap_off      alloc map     no preamble; two parts, one after the other:
                                  fine    heap_max/8 bytes: byte j is the heap's bytes [8j, 8j + 8)
                                  coarse  heap_max/128 bytes: byte j is the heap's bytes
                                          [128j, 128j + 128)
    gmap_off      gen map       the same two parts, indexed as the alloc map: the generation of
                                the object that starts there (below)
    heap_off      heap pages    heap_max bytes, committed in chunks with posix_fallocate

Each preamble is [magic, version, bytes] so a reader refuses a region that is not what it
expects (`Arena.attach` checks them all).

The two parts.  A size class is coarse when its object size is a multiple of 128 (every class
from 128 B on but 144..240, 288..480 bar 384, 576 and 704), and a large object always is: its
objects start on 128-byte grains, so a byte per grain names each start.  The other classes are
fine, and use the fine part, a byte per 8 bytes.  A span's object bytes live in the part of its
class only; the other part's bytes over its pages stay 0 and are never read.  The coarse parts
are per-page tables, reserved with the pages they describe and given back with them
(Layout.page_tables).  The fine parts are not: they are reserved an OS page at a time (32 KiB
of heap) when a span of a fine class is placed over that page, their flags in the fine-map table
say which, and a release gives back the fine-map OS pages that describe only released pages
(PageHeap).  So the maps cost 2/128 of the committed heap plus 1/4 of the heap in fine spans,
rounded up to 32 KiB, instead of 1/4 of all of it.

Allocation-map byte values (one byte per grain; only object starts are ever non-zero):

    0            FREE        not allocated, not in any P's local list
    1            ALLOC       allocated, span not cached by any P (or a large object)
    2            PENDING     freed by a P that does not cache the span; merged by the owner
    3            LISTED      free, sitting in the owning P's local free list (counted optimistically
                             as a malloc, as Go's cacheSpan does; uncounted again at uncache)
    4            RFREED      freed by a P that does not cache the span, its free still in that P's
                             remote-free buffer: still live in the counters, never handed out;
                             written without a lock (a hint that lets a second free fail at once),
                             so a retag may overwrite it -- the buffered free stays authoritative.
                             A large block's owner may take it back out of that buffer (under
                             the heap lock: the entry 0, the block LISTED; LargeObjects.take_back)
    16 + k       TAG(k)      allocated, span cached by P k: P k frees it with one byte store

Handles.  A block's handle is a plain int that names its map byte and its generation:

    handle = (HANDLE_G0 + j) << 8 | gen        fine:   j = off >> 3
                                               coarse: j = heap_max/8 + (off >> 7)

with `off` the block's heap byte offset: the index HANDLE_G0 + j is fine below handle_c0 =
HANDLE_G0 + heap_max/8 (a Layout attribute: it depends on heap_max), coarse from it.  Since the
two parts lie one after the other in the order of their indexes, amap_off + j is the
allocation-map byte of either (gmap_off + j its generation byte): one formula, and the fast
path's map views, indexed by handle >> 8, need no branch.  Going the other way does: a fine index
gives off = j << 3 and page j >> 10, a coarse one off = (j - heap_max/8) << 7 and page
(j - heap_max/8) >> 6 (Layout.handle_offset, handle_page).  `gen` is the generation-map byte of
the object's map byte.  It is bumped (mod 256) each time the object
there becomes free -- a local free (LISTED), a free applied under a lock (FREE or PENDING) --
and never otherwise: not when its span goes back to the page heap, not at a retag, not while a
remote free waits in a buffer (RFREED).  So the live handle of an allocated object carries its
byte; a free object's byte is the generation of the next handle it will be given, one past the
handle it last had (so a second free of that handle says DoubleFree even after its span went back
to the heap); and the 255 handles an address had before its current one all differ from it.  A
stale handle (its block freed and the address reused) is refused by free() and view() with
BadHandle unless its address was freed a multiple of 256 times since (the byte wrapped): with
probability at least 255/256.  A stale handle of the other part (its span's pages reused by a span
of a class of the other part) is refused as well, without its map byte being read.  The
generation map is given back to the OS with the pages it describes, like the alloc map (else what
object starts once touched would stay resident); when released pages are committed again their
coarse generation bytes are all set to one non-zero value that changes with every release
(PageHeap._commit), and so are a fine-map OS page's when it is reserved afresh after anything was
ever released (PageHeap._reserve_fine), so a handle from before the release -- most often
generation 0, an address's first -- is refused unless it happens to carry that value.
HANDLE_G0 (one page of granules) keeps every handle >= HANDLE_MIN (never 0) and lets the fast path
find a fine handle's page with one shift; fine handles of the first 32 MiB of the heap fit in one
30-bit digit of a Python int, which keeps the fast path's arithmetic on them cheap.
"""

import mmap
import os

from . import sizeclasses as sc
from .errors import LayoutMismatch

VERSION = 17
MAGIC = int.from_bytes(b"SHMALLOC", "little")
WORD = 8
ALIGN = sc.PAGE_SIZE
PAGE_SIZE = sc.PAGE_SIZE
PAGE_SHIFT = sc.PAGE_SHIFT
OS_PAGE = mmap.PAGESIZE  # the unit the OS reserves and gives back in
NCLASS = sc.NUM_SIZE_CLASSES

# Allocation-map byte values.
FREE, ALLOC, PENDING, LISTED, RFREED, TAG0 = 0, 1, 2, 3, 4, 16
MAX_SLOTS = 255 - TAG0  # tags must fit in a byte

# Handles (see the module docstring): (index << GEN_BITS) | generation, the index naming one byte
# of the maps: fine, HANDLE_G0 + (offset >> 3), or coarse, Layout.handle_c0 + (offset >> 7).
GEN_BITS = 8
GEN_MASK = (1 << GEN_BITS) - 1
HANDLE_G0 = PAGE_SIZE >> 3  # granules per page: a fine index >> 10 is its page + 1
HANDLE_MIN = HANDLE_G0 << GEN_BITS
FINE, COARSE = 8, 128  # bytes of heap per map byte, in the two parts of each map
FINE_PER_PAGE, COARSE_PER_PAGE = PAGE_SIZE // FINE, PAGE_SIZE // COARSE  # map bytes per heap page
FINE_PAGE_SHIFT, COARSE_PAGE_SHIFT = PAGE_SHIFT - 3, PAGE_SHIFT - 7  # index -> page, in each part
# A size class is coarse when its objects are a whole number of 128-byte grains (and so start on
# one); a large object (class 0) always is.  The rest are fine.
CLASS_COARSE = tuple(c == 0 or sc.CLASS_TO_SIZE[c] % COARSE == 0 for c in range(NCLASS))
CLASS_GRAIN = tuple(COARSE if coarse else FINE for coarse in CLASS_COARSE)


def handle_index(h):
    """(map byte index, generation) a handle names: the index counts from the first byte of the
    maps' fine part, through their coarse part (no range check: the caller checks)."""
    return (h >> GEN_BITS) - HANDLE_G0, h & GEN_MASK


def next_handle(h):
    """The handle the same object gets once h is freed: its generation bumped, mod 256."""
    return h + 1 if h & GEN_MASK != GEN_MASK else h - GEN_MASK


# Region preamble: magic, version, bytes; data starts 8 words in.
PREAMBLE = 8


def _words(*names):
    """Name -> word index, in declaration order."""
    return {n: i for i, n in enumerate(names)}


# --- header (word index from 0) ------------------------------------------------------------
# Written once by the creating daemon before anyone attaches, except where noted.
HDR = _words(
    "magic",
    "version",
    "total_bytes",
    "heap_max",  # bytes
    "nslots",  # P slots for workers; slot nslots is the daemon's actor, nslots+1 the registry's
    "slot_words",  # words per slot, undo log included
    "nrecords",  # span records
    "lock_off",
    "central_off",
    "heapmeta_off",
    "slots_off",
    "spans_off",
    "pagemap_off",
    "amap_off",
    "amap_bytes",
    "heap_off",  # byte offsets / sizes
    "daemon_pid",  # pid of the daemon that serves the arena; written by the daemon
    "epoch",  # last snapshot epoch; written by the daemon only
    "created_ns",  # time.time_ns() at creation
    "flush_count",  # cache flushes done by the daemon; daemon only
    "stopped_epoch",  # epoch of the stop-the-world in progress, 0 = none; daemon only.  A P
    # claimed meanwhile starts stopped (written and read under the registry lock)
    "arena_id",  # 64 random bits drawn at creation: which arena a handle belongs to, for a
    # reference that travels (a pickled Block) -- a name may be reused, this is not
    "endpoint_id",  # which endpoint made the arena: 64 bits of sha256("shmalloc daemon " + endpoint), written by
    # the creating daemon; a daemon adopts a segment only if it names its endpoint
    "retain_target",  # bytes: idle heap the background scavenger keeps committed for reuse; daemon
    # only (service/scavenger.py), 0 when no daemon has set it
    "scavenge_hold_ns",  # the longest heap-lock hold of one background scavenger step; daemon only
    "gmap_off",  # byte offset of the generation map
    "closed",  # CLOSED_* (below): 0 while the arena serves; else why it was closed for good.  Written
    # once, under the registry lock, before every live P's stop byte is set to STOP_CLOSED
    # (shm/world.py close_for_good); a claim after it is refused, a P's slow path raises
    "closed_by",  # pid of the process that closed it (daemon or `shmalloc cleanup --force`)
    "kept_by",  # pid of a daemon that stopped and kept the arena for its live workers, 0 = none;
    # the daemon that adopts it next logs it and clears it
    "slots_high",  # worker slots ever claimed: slots [0, slots_high) are reserved (their words and
    # undo log, Layout.slot_range), the others never touched -- every reader of slot words stays
    # below it (Registry.claimed).  A claim takes the lowest free slot, reserving a new one first;
    # under the registry lock, through the registry actor's undo log; never lowered, and a slot is
    # never given back to the OS (a rolled-back raise leaves a reserved slot above it: harmless)
    "finemap_off",  # byte offset of the fine-map table
)
HEADER_WORDS = 64
# Header words derived from (heap_max, nslots): written at creation, checked by every attacher.
DERIVED = (
    "total_bytes",
    "slot_words",
    "nrecords",
    "lock_off",
    "central_off",
    "heapmeta_off",
    "finemap_off",
    "slots_off",
    "spans_off",
    "pagemap_off",
    "amap_off",
    "amap_bytes",
    "gmap_off",
    "heap_off",
)

# File bytes locked for a whole life rather than around a mutation (see service/daemon.py):
DAEMON_LOCK_BYTE = 1  # held (write) by the daemon serving the arena, for its life
RESUME_LOCK_BYTES = 16  # resume_lock_byte(epoch) is held (write) by the daemon while the world
# is stopped for `epoch`; parked Ps wait for it with a read lock, so they sleep in the kernel,
# not in a poll loop, and wake when the world resumes -- or when the daemon dies.
RESUME_LOCKS = 64  # bytes in turn, from RESUME_LOCK_BYTES: a P woken from one stop holds its
# byte's read lock until it runs again, so a stop takes the next epoch whose byte is free
# (StopTheWorld.begin), and a P still waking never blocks it (a snapshot with 8 workers is 9
# stops: 8 of the ragged round, then the pause).  Nor is a byte re-taken under a P still asleep
# on it: Linux does not queue lock waiters fairly, and it could sleep through the next stop.


def resume_lock_byte(epoch):
    return RESUME_LOCK_BYTES + epoch % RESUME_LOCKS


# --- locks ----------------------------------------------------------------------------------
# Lock ids, in lock order (a process takes them in ascending id order, never the reverse):
# central[c] for c in 1..66 is id c-1, then the heap, then the slot registry.
def LOCK_CENTRAL(c):
    return c - 1


LOCK_HEAP = NCLASS - 1
LOCK_REGISTRY = NCLASS
NLOCKS = NCLASS + 1
LOCK_WORDS = 3  # dirty actor+1 (0 = clean), dirty pid, and that process's start time (clock
# ticks after boot, /proc/<pid>/stat field 22; 0 where unknown) so that a recycled pid is not
# taken for the holder; written by the holder only (a repair clears them), == 0 on a quiet arena
# (Locks.check)


def lock_name(lid):
    """'central[c]', 'heap' or 'registry': how logs and snapshots name lock `lid`."""
    if lid == LOCK_HEAP:
        return "heap"
    if lid == LOCK_REGISTRY:
        return "registry"
    return f"central[{lid + 1}]"


# --- central list, one record per size class -----------------------------------------------
# Every word written under central lock c only.  The identities CentralList.check holds them to
# are written at each word ("==").
CENTRAL = _words(
    "partial",  # record index+1 of the first span with a free object (0 = none)
    #   == the uncached INUSE spans of class c with a free object
    "full",  # record index+1 of the first span with no free object
    #   == the uncached INUSE spans of class c with no free object
    "mallocs",  # objects; cumulative, optimistic: += objects listed into a P's cache,
    #   -= those still listed when the span is uncached (Go's mcentral.nmalloc)
    #   + every P's relists[c] - LISTED bytes of cached spans == the slow walk's
    #   mallocs of class c; on a quiet arena == it alone (stats.check_figures)
    "live",  # objects allocated in spans of this class NOT cached by any P
    #   == sum of alloc_count over the uncached INUSE spans of class c
    "nspans",  # in-use spans of this class (cached or not)
    #   == INUSE spans of class c
    "ncached",  # spans of this class cached by some P
    #   == INUSE spans of class c with owner != 0
    "bad_frees",  # buffered cross-process frees found bad only when applied (a double free
    #   split across processes); counted, logged, never applied; cumulative
    "nempty",  # uncached spans of this class with no object allocated, waiting on the partial
    #   list for the next refill (a batch of remote frees emptied them, or a flush kept them)
    #   == the uncached INUSE spans of class c with alloc_count 0
)
CENTRAL_WORDS = 8

# --- page heap metadata -----------------------------------------------------------------------
# Every word written under the heap lock only.  "== ..." is what PageHeap.check holds a word to,
# or, marked (figures), what stats.check_figures finds the slow walk equal to on a quiet arena.
HEAP = _words(
    "committed_pages",  # pages [0, committed_pages) of the heap are fallocate'd (or released)
    #   == pages tiled by the FREE and INUSE spans, no gap, no overlap
    "inuse_pages",  # pages in INUSE spans
    #   == sum of npages over the INUSE spans
    "released_pages",  # pages of FREE spans given back with MADV_REMOVE
    #   == sum of npages over the released FREE spans (figures)
    "nrecords_used",  # records in state FREE or INUSE
    #   == FREE and INUSE records among the first records_high
    "records_high",  # records ever touched (bump pointer into the span table).  The OS pages
    #   holding records [0, records_high) are reserved (PageHeap.reserve_records, before the
    #   operation that raises it writes anything): derived, no word of its own -- a reservation
    #   is idempotent and never given back, so one made by an operation that was rolled back
    #   or killed is only made again.  Records of released spans stay in use, and UNUSED
    #   records are reused (free_record), never given back: the table's resident size is its
    #   high-water mark
    "free_record",  # record index+1 of the first UNUSED record below records_high
    "large_mallocs",  # large objects allocated; cumulative
    #   + every P's lg_relists - LISTED large spans == the slow walk's (figures)
    "large_live",  # large objects live
    #   == large spans whose start byte is ALLOC or TAG(k) (figures)
    "large_live_pages",  # pages of live large spans
    #   == sum of npages over those spans (figures)
    "large_total_bytes",  # bytes of large spans ever allocated; cumulative
    "grows",  # heap growths; cumulative
    "releases",  # MADV_REMOVE calls; cumulative
    "bad_frees",  # buffered frees of large objects found bad when applied; cumulative
    "idle_head",  # record index+1 of the unreleased FREE span idle longest (the scavenger's next);
    #   linked through idle_next/idle_prev, oldest first, freed_ns never decreasing
    #   == every unreleased FREE span exactly once (PageHeap.check)
    "idle_tail",  # record index+1 of the unreleased FREE span freed last (0 = none)
    "released_total",  # pages ever given back with MADV_REMOVE (scavenger and release); cumulative
    #   >= released_pages (figures: released_bytes >= heap_released)
    "scavenged_pages",  # of which by the background scavenger; cumulative
    "large_taken_back",  # large objects their owner took back out of the remote-free buffer of the
    #   P that freed them (LargeObjects.take_back); cumulative
    "large_pending_frees",  # frees of another P's large objects applied to the owner's pending list
    #   (PENDING) instead; cumulative.  Their sum <= large_frees (stats.identities)
    "fine_map_pages",  # OS pages of the maps' fine part whose flag is set in the fine-map table
    #   == the set flags (PageHeap.check); each flag stands for one OS page of each map
)
HEAP_BUCKETS_AT = 24  # word index of bucket heads: bucket n (1..127) = free spans of n pages,
NBUCKETS = 129  # bucket 128 = free spans of 128 pages or more; each a record index+1
# == every FREE span exactly once, in the bucket of its page count
HEAPMETA_WORDS = HEAP_BUCKETS_AT + NBUCKETS

# --- P slots -------------------------------------------------------------------------------
SLOT = _words(
    "state",  # SLOT_FREE / SLOT_ACTIVE / SLOT_DEAD; under the registry lock
    "pid",  # worker pid; under the registry lock
    "gen",  # incremented at every claim; under the registry lock
    "stop",  # STOP_RUN / STOP_PARK / STOP_RESYNC (below); the fast path reads its low byte.
    #   The daemon writes PARK (and RUN or RESYNC at resume); the P writes RUN
    #   over RESYNC only, inside a call (shm/world.py says why that is safe)
    "stop_epoch",  # epoch of that request; written by the daemon before `stop`
    "parked",  # epoch the P parked for; written by the P (or the daemon if it is dead)
    "flush_gen",  # bumped by the daemon each time it flushes this P's cache while parked
    "synced_gen",  # the flush_gen the P last dropped its local lists for (or found at its
    #   start); written by the P only.  != flush_gen: the P made no allocator call since its
    #   cache was last flushed (every call after a flush resyncs first), so that flush left
    #   nothing to redo -- before its start too, its cache is empty
    "heartbeat_ns",  # time.time_ns() of the P's last control-thread heartbeat
    "claimed_ns",  # time.time_ns() at claim
    "log_used",  # undo log: bytes of entries committed to the log (see locks.py)
    #   == 0 on a quiet arena (Locks.check)
    "log_n",  # undo log: number of entries
    "parked_ns",  # time.monotonic_ns() when the P parked (written just before `parked`)
    "inside",  # low byte 1 while the P is inside an allocator call (fast or slow path);
    #   written by the P only, BEFORE it reads `stop` (see shm/world.py)
    "barrier",  # 1 = the P registered for membarrier(GLOBAL_EXPEDITED), so the daemon may
    #   judge it stopped from `inside` alone; written by the P at claim
    "rfree_n",  # remote-free buffer: entries [0, rfree_n) of rfree[] are frees this P made of
    #   objects it does not cache, not yet applied; written by the P, or by its
    #   flusher while the P is stopped or dead (then under the locks it applies)
    #   every RFREED byte's handle is in some P's rfree[:rfree_n]
    #   (CentralList.check, LargeObjects.check)
    "lg_relists",  # large spans this P re-listed into its large cache by local frees, counted
    #   as mallocs optimistically; folded into the heap figures at flush; P only
    "lg_relist_pages",  # pages of those spans; P only
    "lg_head",  # record index+1 of the first large span this P owns (allocated TAG(k),
    #   LISTED in its large cache, or PENDING); linked through the records'
    #   next/prev; under the heap lock
    #   every INUSE large span with owner k+1 is on it, list LIST_LARGE, its
    #   start byte TAG(k), LISTED, PENDING or RFREED (LargeObjects.check)
    "lg_pending",  # large spans of this P another P freed (PENDING); under the heap lock
    #   == the spans on lg_pend_head's list (LargeObjects.check)
    "lg_pend_head",  # record index+1 of the first of those PENDING spans, linked through the
    #   records' next/prev, tag LIST_LPENDING, newest first; under the heap lock.  Kept apart
    #   from lg_head so that taking them back walks them alone, not every live span the P owns
    "lg_pend_pages",  # pages of the spans on that list; under the heap lock
    "lg_rhint",  # 1: another P buffered a free of one of this P's large blocks (RFREED) since
    #   this P last looked; set by that P after its RFREED store, cleared by this P before it
    #   looks (LargeObjects.take_back).  A hint: one lost leaves that free to the buffer's apply
    "token",  # 64 random bits drawn at claim, 0 while FREE: the P's proof of its slot on the
    #   control channel (register, heartbeat, unregister, admin ops) -- only a process that
    #   can map the arena can read it; under the registry lock
)
SLOT_CACHED_AT = 32  # word index of cached[c], c in 0..66: record index+1 of the span of class c
# this P caches; written under central lock c
# cached[c] == r+1 <=> span r is INUSE, of class c, owner k+1 (CentralList.check)
SLOT_RELISTS_AT = 104  # word index of relists[c], c in 0..66: objects of class c this P re-listed
# by local frees (LISTED again, counted as mallocs optimistically, as at
# collect); written by the P only; folded into central[c].mallocs when the
# span of class c is uncached.  Every P quiet (relists, lg_relists, rfree_n
# 0, nothing cached or owned: stats.quiet_slot) => fast figures == slow
# (stats.check_figures)
SLOT_LAST_AT = 176  # word index of last[c], c in 0..66: record index+1 of the span of class c a
# flush (one that leaves the P its slot: a snapshot's) took from this P, 0 once the P caches a span
# of class c again; written under central lock c.  A hint: the P's next span of that class is that
# one while it waits on the partial list (CentralList.cache_span); one a slot's earlier owner left
# names at most another waiting span
SLOT_RFREE_AT = 256  # word index of rfree[i], i < RFREE_CAP: handles this P freed remotely
RFREE_CAP = 256
SLOT_HEAD_WORDS = 512
LOG_BYTES = 64 * 1024  # undo log bytes per actor
SLOT_FREE, SLOT_ACTIVE = 0, 1
STOP_RUN = 0  # run: the fast path may go on
STOP_PARK = 1  # the world is stopping for epoch stop_epoch: park at the next call
STOP_RESYNC = 2  # the daemon flushed this P's cache: drop the local lists at the next call
STOP_CLOSED = 3  # the arena was closed for good (HDR closed says why): every call raises ArenaClosed
# Why an arena was closed for good (HDR closed).
CLOSED_FORCED = 1  # its daemon stopped with --force: live workers were told
CLOSED_STOPPED = 2  # its daemon stopped with no live worker and removed it
CLOSED_CLEANUP = 3  # `shmalloc cleanup --force` removed it under live workers
CLOSED_REPLACED = 4  # a worker found its daemon's endpoint served by a daemon of another arena

# --- span records --------------------------------------------------------------------------
SPAN = _words(
    "start",  # first page (index into the heap)
    "npages",  # pages
    "state",  # SPAN_UNUSED / SPAN_FREE / SPAN_INUSE; under the heap lock
    "sizeclass",  # 0 = large object; else a size class; set under the heap lock
    "owner",  # slot+1 of the P caching this span, 0 = none; under central lock (heap lock
    #   for a large span: the P that allocated it owns it until it is flushed)
    "list",  # LIST_* ; which list links this record (central lock, or heap lock for free)
    "next",  # record index+1 in that list
    "prev",  # record index+1 in that list
    "alloc_count",  # objects allocated; valid while owner == 0; under central lock
    #   == its ALLOC + RFREED object bytes while owner == 0 (CentralList.check)
    "npending",  # PENDING bytes waiting for the owner; under central lock
    #   == its PENDING object bytes while owner != 0 (CentralList.check)
    "nelems",  # objects in the span; set with sizeclass
    "released",  # 1 = FREE span whose pages were given back (MADV_REMOVE); heap lock
    "idle_next",  # record index+1: the next unreleased FREE span in freeing order (HEAP
    "idle_prev",  #   idle_head/idle_tail); 0 while the span is in use or released; heap lock
    "freed_ns",  # time.monotonic_ns() when this FREE span was made (freed, grown or merged:
    #   a merge is as young as its youngest part); heap lock
)
SPAN_WORDS = 16
SPAN_UNUSED, SPAN_FREE, SPAN_INUSE = 0, 1, 2
LIST_NONE, LIST_PARTIAL, LIST_FULL, LIST_HEAPFREE, LIST_UNUSED, LIST_LARGE = 0, 1, 2, 3, 4, 5
LIST_LPENDING = 6
# LIST_LARGE: a large span owned by a P, on that P's lg_head list (heap lock); LIST_LPENDING: one
# another P freed (PENDING), on its owner's lg_pend_head list (heap lock)

REGION_MAGIC = {
    "locks": 0x4B434F4C,  # "LOCK"
    "central": 0x4C544E43,  # "CNTL"
    "heapmeta": 0x50414548,  # "HEAP"
    "finemap": 0x50414D46,  # "FMAP"
    "spans": 0x4E415053,  # "SPAN"
    "pagemap": 0x50414D50,  # "PMAP"
}


def _up(n, a=ALIGN):
    return (n + a - 1) // a * a


class Layout:
    """Offsets (bytes) of every region, computed from (heap_max, nslots)."""

    def __init__(self, heap_max, nslots):
        if heap_max < PAGE_SIZE or heap_max % PAGE_SIZE:
            raise ValueError(f"heap size must be a positive multiple of {PAGE_SIZE} bytes, got {heap_max}")
        if not 1 <= nslots <= MAX_SLOTS:
            raise ValueError(f"nslots must be in 1..{MAX_SLOTS}, got {nslots}")
        self.heap_max = heap_max
        self.heap_pages = heap_max // PAGE_SIZE
        self.nslots = nslots
        self.nrecords = self.heap_pages + 1
        self.slot_words = SLOT_HEAD_WORDS + LOG_BYTES // WORD
        off = _up(HEADER_WORDS * WORD)
        self.lock_off = off
        off = _up(off + (PREAMBLE + NLOCKS * LOCK_WORDS) * WORD)
        self.central_off = off
        off = _up(off + (PREAMBLE + NCLASS * CENTRAL_WORDS) * WORD)
        self.heapmeta_off = off
        off = _up(off + (PREAMBLE + HEAPMETA_WORDS) * WORD)
        # The maps' two parts (module docstring): the fine part, a byte per 8 heap bytes, then
        # the coarse part, a byte per 128; handle indexes run through both in that order.
        self.fine_bytes = heap_max // FINE
        self.amap_bytes = self.fine_bytes + heap_max // COARSE  # either map, both parts
        self.handle_c0 = HANDLE_G0 + self.fine_bytes  # the first coarse index
        # Fine-map table: a byte per OS page of the maps' fine part (the last one may hold the
        # first coarse bytes too), 1 = that OS page of both maps is reserved (PageHeap).
        self.fine_os_pages = -(-self.fine_bytes // OS_PAGE)
        self.finemap_off = off
        self.finemap_flags = off + PREAMBLE * WORD  # byte offset of page 0's flag
        off = _up(self.finemap_flags + self.fine_os_pages)
        self.slots_off = off
        off = _up(off + (nslots + 2) * self.slot_words * WORD)
        self.spans_off = off
        off = _up(off + (PREAMBLE + self.nrecords * SPAN_WORDS) * WORD)
        self.pagemap_off = off
        off = _up(off + (PREAMBLE + self.heap_pages) * WORD)
        self.amap_off = off
        off = _up(off + self.amap_bytes)
        self.gmap_off = off  # same indexing as the alloc map, amap_bytes long
        off = _up(off + self.amap_bytes)
        self.heap_off = off
        self.total_bytes = off + heap_max
        # Every table indexed by heap page, as (offset of page 0's entry, bytes per heap page,
        # given back with its pages): PageHeap reserves a table's entries with the pages they
        # describe before anything touches them (a write -- or a read -- of an unreserved page of
        # a full tmpfs is SIGBUS), and releases them with the pages when the last column says so.
        # Another per-page table is one more line here.  The maps' fine parts are not: they are
        # reserved by the fine-map table's OS page, for the spans of fine classes only (PageHeap).
        self.page_tables = (
            # Allocation map's coarse part: 64 bytes per page, zero while the page is free (FREE),
            # so given back with it -- what a released span keeps is only the OS pages it shares.
            (self.amap_off + self.fine_bytes, COARSE_PER_PAGE, True),
            # Generation map's coarse part: 64 bytes per page, given back with its pages too (else
            # what object starts once touched would stay resident for good); the heap writes a
            # fresh non-zero generation over a released range's entries when it commits it again.
            (self.gmap_off + self.fine_bytes, COARSE_PER_PAGE, True),
            # Page map: kept.  Any handle's lookup (a free, a view) reads its page's entry
            # without knowing whether the page was released, and free spans keep theirs at
            # their ends; one word per 8 KiB page is 0.1% of the heap.
            (self.pagemap_off + PREAMBLE * WORD, WORD, False),
            # (The span table is indexed by record, not page: its pages are reserved as records
            # come into use -- PageHeap.reserve_records -- not with the heap pages.)
        )
        self.region_bytes = {
            "locks": self.central_off - self.lock_off,
            "central": self.heapmeta_off - self.central_off,
            "heapmeta": self.finemap_off - self.heapmeta_off,
            "finemap": self.slots_off - self.finemap_off,
            "spans": self.pagemap_off - self.spans_off,
            "pagemap": self.amap_off - self.pagemap_off,
        }

    # Word indexes (into the Q view) of the structures.
    def lock_word(self, lid):
        return self.lock_off // WORD + PREAMBLE + lid * LOCK_WORDS

    def central_word(self, c):
        return self.central_off // WORD + PREAMBLE + c * CENTRAL_WORDS

    def heap_word(self):
        return self.heapmeta_off // WORD + PREAMBLE

    def slot_word(self, k):
        return self.slots_off // WORD + k * self.slot_words

    def slot_log_off(self, k):
        """Byte offset of slot k's undo log."""
        return (self.slot_word(k) + SLOT_HEAD_WORDS) * WORD

    def span_word(self, r):
        return self.spans_off // WORD + PREAMBLE + r * SPAN_WORDS

    def pagemap_word(self):
        return self.pagemap_off // WORD + PREAMBLE

    def amap_byte(self, h):
        """Byte offset in the segment of handle h's allocation-map byte (no range check)."""
        return self.amap_off + (h >> GEN_BITS) - HANDLE_G0

    def gmap_byte(self, h):
        """Byte offset in the segment of handle h's generation byte (no range check)."""
        return self.gmap_off + (h >> GEN_BITS) - HANDLE_G0

    # Handles and map indexes (module docstring): j = a map byte's index, fine below fine_bytes.
    def span_index(self, start, c):
        """(map index of page `start`'s first byte, heap bytes per map byte) for a span of class
        `c` (0: a large object) starting at heap page `start`."""
        if CLASS_COARSE[c]:
            return self.fine_bytes + start * COARSE_PER_PAGE, COARSE
        return start * FINE_PER_PAGE, FINE

    def make_handle(self, off, gen, c):
        """The handle of the object of class `c` (0: large) at heap byte offset `off`."""
        if CLASS_COARSE[c]:
            return (self.handle_c0 + (off >> 7)) << GEN_BITS | gen
        return (HANDLE_G0 + (off >> 3)) << GEN_BITS | gen

    def index_offset(self, j):
        """Heap byte offset that map index j describes (no range check)."""
        f = self.fine_bytes
        return j << 3 if j < f else (j - f) << 7

    def index_page(self, j):
        """Heap page that map index j describes (no range check)."""
        f = self.fine_bytes
        return j >> FINE_PAGE_SHIFT if j < f else (j - f) >> COARSE_PAGE_SHIFT

    def handle_offset(self, h):
        """Heap byte offset of the object a handle names (no check)."""
        return self.index_offset((h >> GEN_BITS) - HANDLE_G0)

    def handle_page(self, h):
        """Heap page of the object a handle names (no check)."""
        return self.index_page((h >> GEN_BITS) - HANDLE_G0)

    def fine_pages(self, start, npages, inside=False):
        """range of the fine-map OS pages (the fine-map table's entries) holding the fine bytes of
        heap pages [start, start + npages): every one that holds some, or with `inside` only
        those that hold nothing else (and no coarse byte)."""
        lo, hi = start * FINE_PER_PAGE, (start + npages) * FINE_PER_PAGE
        if inside:
            return range(-(-lo // OS_PAGE), min(hi, self.fine_bytes) // OS_PAGE)
        return range(lo // OS_PAGE, -(-hi // OS_PAGE))

    def fine_ranges(self, pages):
        """[(offset, bytes)] of fine-map OS pages `pages` (a range) in both maps."""
        if not pages:
            return []
        n = len(pages) * OS_PAGE
        return [(self.amap_off + pages.start * OS_PAGE, n), (self.gmap_off + pages.start * OS_PAGE, n)]

    def region_offsets(self):
        return {
            "locks": self.lock_off,
            "central": self.central_off,
            "heapmeta": self.heapmeta_off,
            "finemap": self.finemap_off,
            "spans": self.spans_off,
            "pagemap": self.pagemap_off,
        }

    # What is reserved (posix_fallocate) before it is touched: see PageHeap and Registry.claim.
    def fixed_ranges(self):
        """[(offset, bytes)] of the fixed regions -- header, locks, central, heap metadata, the
        daemon's and the registry's actor slots with their undo logs, the span table's and page
        map's preambles -- reserved at creation.  A worker's slot is reserved at its first claim
        (slot_range), the span records as they come into use (record_pages)."""
        actors = self.slot_word(self.nslots) * WORD
        return [
            (0, self.slots_off),
            (actors, 2 * self.slot_words * WORD),
            (self.spans_off, PREAMBLE * WORD),
            (self.pagemap_off, PREAMBLE * WORD),
        ]

    def slot_range(self, k):
        """(offset, bytes) of P slot k: its words and its undo log."""
        return self.slot_word(k) * WORD, self.slot_words * WORD

    def record_pages(self, nrecords):
        """(offset, bytes) of the span table's OS pages that records [0, nrecords) touch, the
        preamble's page included: what a table of `nrecords` records in use holds reserved."""
        end = self.span_word(nrecords) * WORD
        return self.spans_off, -(-end // OS_PAGE) * OS_PAGE - self.spans_off

    def page_meta(self, start, npages, released=False):
        """[(offset, bytes)] of every table's entries for heap pages [start, start + npages)
        (page_tables); with `released`, only the tables given back with their pages."""
        return [
            (base + start * per, npages * per) for base, per, rel in self.page_tables if rel or not released
        ]

    def released_meta(self, start, npages, piece=None):
        """[(offset, bytes)] of the OS pages that lie wholly inside the entries of heap pages
        [start, start + npages) of the tables given back with their pages, and of the maps' fine
        parts: what a release of those pages gives back too, and never a byte that describes
        another page.  With `piece` (start, npages: pages among them), only the OS pages that
        describe a page of the piece: what releasing the piece gives back once it is joined to
        the released pages around it -- the OS pages across its ends included, which describe
        pages on both sides and so went with neither side's own release."""
        outer = self.page_meta(start, npages, released=True)
        inner = outer if piece is None else self.page_meta(*piece, released=True)
        out = []
        for (off, n), (poff, pn) in zip(outer, inner, strict=True):
            lo = max(-(-off // OS_PAGE), poff // OS_PAGE) * OS_PAGE
            hi = min((off + n) // OS_PAGE, -(-(poff + pn) // OS_PAGE)) * OS_PAGE
            if hi > lo:
                out.append((lo, hi - lo))
        return out + self.fine_ranges(self.released_fine(start, npages, piece))

    def released_fine(self, start, npages, piece=None):
        """range of the fine-map OS pages a release of heap pages [start, start + npages) gives
        back -- with `piece`, those of them that describe a page of the piece (released_meta)."""
        pages = self.fine_pages(start, npages, inside=True)
        if piece is None:
            return pages
        near = self.fine_pages(*piece)
        return range(max(pages.start, near.start), min(pages.stop, near.stop))

    # Header I/O.
    def write_header(self, q, now_ns):
        h = [0] * HEADER_WORDS
        vals = dict(
            magic=MAGIC,
            version=VERSION,
            heap_max=self.heap_max,
            nslots=self.nslots,
            created_ns=now_ns,
            arena_id=int.from_bytes(os.urandom(8), "little") or 1,
        )
        vals.update((k, getattr(self, k)) for k in DERIVED)
        for k, v in vals.items():
            h[HDR[k]] = v
        for name, off in self.region_offsets().items():
            w = off // WORD
            q[w], q[w + 1], q[w + 2] = REGION_MAGIC[name], VERSION, self.region_bytes[name]
        # Header last (magic last of all), so a concurrent attacher never sees a half header.
        for i in range(1, HEADER_WORDS):
            q[i] = h[i]
        q[0] = MAGIC

    @classmethod
    def from_header(cls, q, segment_bytes):
        """Rebuild the layout from a segment's header, refusing anything else."""
        if len(q) < HEADER_WORDS or q[HDR["magic"]] != MAGIC:
            raise LayoutMismatch("segment is not a shmalloc arena (bad magic)")
        if q[HDR["version"]] != VERSION:
            raise LayoutMismatch(f"arena layout version {q[HDR['version']]}, this code speaks {VERSION}")
        lay = cls(q[HDR["heap_max"]], q[HDR["nslots"]])
        for k in DERIVED:
            if q[HDR[k]] != getattr(lay, k):
                raise LayoutMismatch(
                    f"arena header field {k}={q[HDR[k]]} disagrees with layout {getattr(lay, k)}"
                )
        if segment_bytes < lay.total_bytes:
            raise LayoutMismatch(f"segment is {segment_bytes} bytes, arena needs {lay.total_bytes}")
        for name, off in lay.region_offsets().items():
            w = off // WORD
            if (q[w], q[w + 1], q[w + 2]) != (REGION_MAGIC[name], VERSION, lay.region_bytes[name]):
                raise LayoutMismatch(f"region {name} at {off} has a bad preamble")
        return lay
