"""Stats: every figure declared once, read fast, read slow, checked.  See shm/__init__.py.

FIELDS is the one declaration of the snapshot's figures -- name, unit, kind, meaning -- that the
snapshot, the CLI table (service/cli.py), the metrics export (service/metrics.py) and the docs
are generated from (mimalloc's MI_STAT_FIELDS, Go's MemStats comments).

    read_stats(arena)       the fast figures, from the counters the allocator keeps.  EXACT
                            ONLY AFTER EVERY CACHE WAS FLUSHED: objects in spans cached by a P
                            are not in `live`, and objects a P has listed are counted as
                            mallocs optimistically (Go's cacheSpan).  Arena.update_stats
                            flushes first -- the order of golang/go commit 0ddde4ada2b1.
    read_stats_slow(arena)  recomputes every figure from the ground truth (span table, page
                            map, allocation map), valid flushed or not (Go: ReadMemStatsSlow).
    identities(snap)        the identities of Go's TestMemStats, on any snapshot dict.
    check_figures(arena)    the figures' part of Arena.check_all: identities on the slow walk,
                            fast == slow when no P holds anything.  The structural checks live
                            beside their structures (Locks, PageHeap, CentralList, LargeObjects).

How frees are counted.  A free is never counted by a per-operation counter: frees of class c
are `mallocs[c] - live[c]`, live objects being ground truth in the allocation map.  So a process
killed between any two instructions cannot make mallocs, frees and live objects disagree.
"""

from . import layout as L
from .central import allocated
from .errors import LockUnavailable
from .sizeclasses import CLASS_TO_SIZE

H = L.HEAP
C = L.CENTRAL
PAGE = L.PAGE_SIZE
SPAN_BYTES = L.SPAN_WORDS * 8

# (name, unit, kind, help).  kind: gauge | counter | info.  Units: bytes, objects, count, ns.
# The comments are the identities every consistent snapshot satisfies (identities() checks them,
# Go's TestMemStats); besides them, every figure is >= 0 and by_size frees <= mallocs per class.
# On a quiet arena read_stats == read_stats_slow, figure by figure (check_figures).
FIELDS = (
    # sys == heap_sys + mspan_sys + mcache_sys + gc_sys + other_sys
    (
        "sys",
        "bytes",
        "gauge",
        "Bytes of the arena in use by the allocator: heap_sys + mspan_sys + mcache_sys + gc_sys + other_sys.",
    ),
    ("heap_sys", "bytes", "gauge", "Heap bytes committed (posix_fallocate) so far, released pages included."),
    # heap_idle + heap_inuse == heap_sys;  heap_released <= heap_idle
    ("heap_idle", "bytes", "gauge", "Heap bytes in free spans (heap_sys - heap_inuse)."),
    (
        "heap_inuse",
        "bytes",
        "gauge",
        "Heap bytes in spans holding objects (small-class spans and large objects).",
    ),
    (
        "heap_released",
        "bytes",
        "gauge",
        "Bytes of free spans given back to the OS with MADV_REMOVE (part of heap_idle).",
    ),
    # heap_alloc <= heap_inuse;  heap_alloc == sum of by_size (mallocs - frees) * size + large_bytes
    (
        "heap_alloc",
        "bytes",
        "gauge",
        "Bytes of live objects: class size times live small objects, plus whole large spans.",
    ),
    # total_alloc >= heap_alloc
    (
        "total_alloc",
        "bytes",
        "counter",
        "Bytes ever allocated (class size for small objects, span bytes for large ones).",
    ),
    # heap_objects == mallocs - frees
    ("heap_objects", "objects", "gauge", "Live objects (mallocs - frees)."),
    # mallocs == sum of by_size mallocs + large_mallocs;  frees == sum of by_size frees + large_frees
    ("mallocs", "objects", "counter", "Objects ever allocated."),
    ("frees", "objects", "counter", "Objects ever freed."),
    ("mspan_sys", "bytes", "gauge", "Span-table bytes ever touched (records_high records)."),
    ("mspan_inuse", "bytes", "gauge", "Span-table bytes of records in use (free and in-use spans)."),
    ("mcache_sys", "bytes", "gauge", "P-slot bytes (caches, undo logs) of the slots ever claimed."),
    ("mcache_inuse", "bytes", "gauge", "P-slot bytes of slots held by a worker."),
    (
        "gc_sys",
        "bytes",
        "gauge",
        "Allocation- and generation-map bytes reserved: their coarse parts over the committed heap (a byte "
        "each per 128 heap bytes), and the OS pages of their fine parts reserved for spans of small classes "
        "(a byte each per 8 heap bytes).",
    ),
    (
        "other_sys",
        "bytes",
        "gauge",
        "Header, lock words, central lists, heap metadata, service slots, and the page map of the committed heap.",
    ),
    ("large_mallocs", "objects", "counter", "Large objects (over 32 KiB) ever allocated."),
    ("large_frees", "objects", "counter", "Large objects ever freed."),
    ("large_bytes", "bytes", "gauge", "Bytes of live large spans."),
    # large_taken_back + large_pending_frees <= large_frees
    (
        "large_taken_back",
        "objects",
        "counter",
        "Large objects freed by another process that their owner took back out of that process's "
        "remote-free buffer, for its own cache: reused without a lock on the freeing side or the page heap.",
    ),
    (
        "large_pending_frees",
        "objects",
        "counter",
        "Large objects freed by another process whose free reached their owner through its pending list "
        "instead: the freeing process applied its buffer before the owner looked.",
    ),
    (
        "bad_frees",
        "objects",
        "counter",
        "Cross-process frees found bad only when their batch was applied (a double "
        "free split across processes, or a stale handle): counted and logged, never applied.",
    ),
    # released_bytes >= heap_released;  released_bytes >= scavenged_bytes
    (
        "released_bytes",
        "bytes",
        "counter",
        "Heap bytes ever given back to the OS with MADV_REMOVE, by the background scavenger and by release.",
    ),
    ("scavenged_bytes", "bytes", "counter", "Of released_bytes, those the background scavenger gave back."),
    (
        "retain_target",
        "bytes",
        "gauge",
        "Idle heap bytes the background scavenger keeps committed for reuse (--retain); it gives back the rest.",
    ),
    (
        "scavenge_hold_ns",
        "ns",
        "gauge",
        "Longest heap-lock hold of one background scavenger step since the daemon started.",
    ),
)
FIELD_NAMES = tuple(f[0] for f in FIELDS)
# Snapshot keys that are not figures of the arena but of the snapshot itself.
META_FIELDS = (
    ("consistent", "bool", "info", "True when every P was parked and flushed before reading."),
    ("epoch", "count", "counter", "Snapshot number, from 1."),
    ("pause_ns", "ns", "gauge", "Stop-the-world pause of this snapshot."),
    ("num_p", "count", "gauge", "Live Ps (connected workers) at the snapshot."),
)
COUNTERS = tuple(f[0] for f in FIELDS if f[2] == "counter")


def _sys_parts(arena, committed_pages, records_high, records_used, nactive, fine_map_pages):
    lay = arena.lay
    slot_bytes = lay.slot_words * 8
    heap_sys = committed_pages * PAGE
    other = (
        lay.central_off  # header + lock words
        + lay.region_bytes["central"]
        + lay.region_bytes["heapmeta"]
        + 2 * slot_bytes  # the daemon's and the registry's actor slots
        + L.PREAMBLE * 8 * 2  # span-table and page-map preambles
        + committed_pages * 8
    )  # page map of the committed heap
    return dict(
        heap_sys=heap_sys,
        mspan_sys=records_high * SPAN_BYTES,
        mspan_inuse=records_used * SPAN_BYTES,
        mcache_sys=len(arena.registry.claimed()) * slot_bytes,  # reserved at first claim
        mcache_inuse=nactive * slot_bytes,
        gc_sys=2 * (committed_pages * L.COARSE_PER_PAGE + fine_map_pages * L.OS_PAGE),  # both maps
        other_sys=other,
    )


def _assemble(
    arena,
    committed,
    inuse_pages,
    released_pages,
    records_high,
    records_used,
    nactive,
    fine_map_pages,
    mallocs_c,
    live_c,
    large_mallocs,
    large_live,
    large_live_pages,
    large_total_bytes,
):
    d = _sys_parts(arena, committed, records_high, records_used, nactive, fine_map_pages)
    d["sys"] = d["heap_sys"] + d["mspan_sys"] + d["mcache_sys"] + d["gc_sys"] + d["other_sys"]
    d["heap_inuse"] = inuse_pages * PAGE
    d["heap_idle"] = d["heap_sys"] - d["heap_inuse"]
    d["heap_released"] = released_pages * PAGE
    by_size = [
        {"size": CLASS_TO_SIZE[c], "mallocs": mallocs_c[c], "frees": mallocs_c[c] - live_c[c]}
        for c in range(1, L.NCLASS)
    ]
    small_bytes = sum(live_c[c] * CLASS_TO_SIZE[c] for c in range(1, L.NCLASS))
    d["large_mallocs"] = large_mallocs
    d["large_frees"] = large_mallocs - large_live
    d["large_bytes"] = large_live_pages * PAGE
    d["heap_alloc"] = small_bytes + d["large_bytes"]
    d["heap_objects"] = sum(live_c[1:]) + large_live
    d["mallocs"] = sum(mallocs_c[1:]) + large_mallocs
    d["frees"] = d["mallocs"] - d["heap_objects"]
    d["total_alloc"] = sum(mallocs_c[c] * CLASS_TO_SIZE[c] for c in range(1, L.NCLASS)) + large_total_bytes
    d["by_size"] = by_size
    q, hw = arena.q, arena.lay.heap_word()
    d["bad_frees"] = q[hw + H["bad_frees"]]
    d["large_taken_back"] = q[hw + H["large_taken_back"]]
    d["large_pending_frees"] = q[hw + H["large_pending_frees"]]
    d["released_bytes"] = q[hw + H["released_total"]] * PAGE
    d["scavenged_bytes"] = q[hw + H["scavenged_pages"]] * PAGE
    d["retain_target"] = q[L.HDR["retain_target"]]
    d["scavenge_hold_ns"] = q[L.HDR["scavenge_hold_ns"]]
    return d


def read_stats(arena):
    """The fast figures (see the module docstring: exact only after a flush)."""
    q, lay = arena.q, arena.lay
    hw = lay.heap_word()
    hg = lambda n: q[hw + H[n]]  # noqa: E731
    mallocs_c = [0] * L.NCLASS
    live_c = [0] * L.NCLASS
    for c in range(1, L.NCLASS):
        cw = lay.central_word(c)
        mallocs_c[c] = q[cw + C["mallocs"]]
        live_c[c] = q[cw + C["live"]]
    return _assemble(
        arena,
        hg("committed_pages"),
        hg("inuse_pages"),
        hg("released_pages"),
        hg("records_high"),
        hg("nrecords_used"),
        len(arena.registry.active_slots()),
        hg("fine_map_pages"),
        mallocs_c,
        live_c,
        hg("large_mallocs"),
        hg("large_live"),
        hg("large_live_pages"),
        hg("large_total_bytes"),
    )


def read_stats_slow(arena, records=None):
    """Every figure recomputed from the span table and the allocation map (Go's
    ReadMemStatsSlow).  Cumulative counters come from the counters, corrected for objects that
    sit listed in a P's cache (counted optimistically, not yet handed out)."""
    q, lay = arena.q, arena.lay
    hw = lay.heap_word()
    records = arena.heap.span_records() if records is None else records
    mallocs_c = [q[lay.central_word(c) + C["mallocs"]] if c else 0 for c in range(L.NCLASS)]
    large_mallocs, large_total = q[hw + H["large_mallocs"]], q[hw + H["large_total_bytes"]]
    # Objects the Ps re-listed by local frees were counted as mallocs to come (slot relists), as
    # were the large spans they keep; those still listed below never happened.
    for k in arena.registry.claimed():
        sw = lay.slot_word(k)
        rel = q[sw + L.SLOT_RELISTS_AT : sw + L.SLOT_RELISTS_AT + L.NCLASS].tolist()
        for c in range(1, L.NCLASS):
            mallocs_c[c] += rel[c]
        large_mallocs += q[sw + L.SLOT["lg_relists"]]
        large_total += q[sw + L.SLOT["lg_relist_pages"]] * PAGE
    live_c = [0] * L.NCLASS
    inuse_pages = released_pages = large_live = large_live_pages = 0
    amap = arena.mv
    for rec in records:
        if rec["state"] == L.SPAN_FREE:
            if rec["released"]:
                released_pages += rec["npages"]
            continue
        inuse_pages += rec["npages"]
        c = rec["sizeclass"]
        if c == 0:
            b = amap[lay.amap_off + lay.span_index(rec["start"], 0)[0]]
            if b == L.ALLOC or b >= L.TAG0:
                large_live += 1
                large_live_pages += rec["npages"]
            elif b == L.LISTED:
                large_mallocs -= 1
                large_total -= rec["npages"] * PAGE
            continue
        b = arena.central.object_bytes(rec)
        live_c[c] += allocated(b)
        if rec["owner"]:
            mallocs_c[c] -= b.count(L.LISTED)
    committed = q[hw + H["committed_pages"]]
    flags = bytes(amap[lay.finemap_flags : lay.finemap_flags + lay.fine_os_pages])
    return _assemble(
        arena,
        committed,
        inuse_pages,
        released_pages,
        q[hw + H["records_high"]],
        len(records),
        len(arena.registry.active_slots()),
        len(flags) - flags.count(0),  # the fine-map table, counted
        mallocs_c,
        live_c,
        large_mallocs,
        large_live,
        large_live_pages,
        large_total,
    )


def identities(s):
    """The identities every consistent snapshot satisfies (a port of Go's TestMemStats).
    Returns the broken ones, each named; an empty list means all hold."""
    bad = []

    def want(cond, what):
        if not cond:
            bad.append(what)

    parts = s["heap_sys"] + s["mspan_sys"] + s["mcache_sys"] + s["gc_sys"] + s["other_sys"]
    want(s["sys"] == parts, f"sys {s['sys']} != heap_sys+mspan_sys+mcache_sys+gc_sys+other_sys {parts}")
    want(
        s["heap_idle"] + s["heap_inuse"] == s["heap_sys"],
        f"heap_idle {s['heap_idle']} + heap_inuse {s['heap_inuse']} != heap_sys {s['heap_sys']}",
    )
    want(
        s["heap_released"] <= s["heap_idle"],
        f"heap_released {s['heap_released']} > heap_idle {s['heap_idle']}",
    )
    want(
        s["heap_released"] <= s["released_bytes"],
        f"heap_released {s['heap_released']} > released_bytes {s['released_bytes']}",
    )
    want(
        s["scavenged_bytes"] <= s["released_bytes"],
        f"scavenged_bytes {s['scavenged_bytes']} > released_bytes {s['released_bytes']}",
    )
    want(s["heap_alloc"] <= s["heap_inuse"], f"heap_alloc {s['heap_alloc']} > heap_inuse {s['heap_inuse']}")
    want(
        s["heap_objects"] == s["mallocs"] - s["frees"],
        f"heap_objects {s['heap_objects']} != mallocs {s['mallocs']} - frees {s['frees']}",
    )
    want(
        s["total_alloc"] >= s["heap_alloc"], f"total_alloc {s['total_alloc']} < heap_alloc {s['heap_alloc']}"
    )
    by = s["by_size"]
    small = sum((e["mallocs"] - e["frees"]) * e["size"] for e in by)
    want(
        s["heap_alloc"] == small + s["large_bytes"],
        f"heap_alloc {s['heap_alloc']} != sum by_size live bytes {small} + large_bytes {s['large_bytes']}",
    )
    want(
        s["large_taken_back"] + s["large_pending_frees"] <= s["large_frees"],
        f"large_taken_back {s['large_taken_back']} + large_pending_frees {s['large_pending_frees']} > "
        f"large_frees {s['large_frees']}",
    )
    want(
        s["mallocs"] == sum(e["mallocs"] for e in by) + s["large_mallocs"],
        f"mallocs {s['mallocs']} != sum by_size mallocs + large_mallocs",
    )
    want(
        s["frees"] == sum(e["frees"] for e in by) + s["large_frees"],
        f"frees {s['frees']} != sum by_size frees + large_frees",
    )
    for e in by:
        want(e["frees"] <= e["mallocs"], f"class {e['size']}: frees {e['frees']} > mallocs {e['mallocs']}")
    for k in FIELD_NAMES:
        want(s[k] >= 0, f"{k} is negative: {s[k]}")
    return bad


def monotonic(prev, cur):
    """Cumulative counters never decrease between snapshots."""
    bad = [f"{k} went backwards: {prev[k]} -> {cur[k]}" for k in COUNTERS if cur[k] < prev[k]]
    for a, b in zip(prev["by_size"], cur["by_size"]):
        for k in ("mallocs", "frees"):
            if b[k] < a[k]:
                bad.append(f"by_size[{a['size']}].{k} went backwards: {a[k]} -> {b[k]}")
    return bad


def read_compared(arena):
    """(read_stats(arena), its differences from read_stats_slow(arena)), both read under the
    registry lock -- a raw lock, only reads -- so that no P is claimed between them: a slot
    claimed there would count in one and not the other (mcache_sys, mcache_inuse).  When the
    lock is not taken in time (a bounded wait, in the daemon) the figures are not compared,
    and the one difference says why."""
    try:
        arena.locks.raw_acquire(L.LOCK_REGISTRY)
    except LockUnavailable as e:
        return read_stats(arena), [f"not compared: the registry lock was not taken ({e})"]
    try:
        fast = read_stats(arena)
        return fast, diff(fast, read_stats_slow(arena))
    finally:
        arena.locks.raw_release(L.LOCK_REGISTRY)


def diff(a, b):
    """Field-by-field differences between two snapshots (fast vs slow)."""
    out = [f"{k}: {a[k]} != {b[k]}" for k in FIELD_NAMES if a[k] != b[k]]
    for x, y in zip(a["by_size"], b["by_size"]):
        if x != y:
            out.append(f"by_size[{x['size']}]: {x} != {y}")
    return out


def quiet_slot(arena, k):
    """P k holds nothing a flush would change: no cached span, no owned large span, no buffered
    free, no re-listed object counted ahead."""
    q, sw = arena.q, arena.lay.slot_word(k)
    return not (
        arena.cached_spans(k)
        or q[sw + L.SLOT["lg_head"]]
        or q[sw + L.SLOT["rfree_n"]]
        or any(q[sw + L.SLOT_RELISTS_AT : sw + L.SLOT_RELISTS_AT + L.NCLASS].tolist())
        or q[sw + L.SLOT["lg_relists"]]
    )


def check_figures(arena, records):
    """The identities hold on the slow walk, and the fast figures equal it when no P caches a span
    (`records`: PageHeap.span_records()).  Returns the problems (Arena.check_all runs it last)."""
    # Figures: the fast read must equal the slow walk whenever no P caches a span.
    slow = read_stats_slow(arena, records)
    bad = identities(slow)
    if all(quiet_slot(arena, k) for k in arena.registry.claimed()):
        bad += ["fast != slow: " + d for d in diff(read_stats(arena), slow)]
    return bad
