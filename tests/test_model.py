"""The allocator against a plain-Python model (hypothesis state machine), and tables of
page-heap states: before, operations, after (after Go's page-allocator tests)."""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support import metadata_bytes, pattern, unique_name, unreserved

from shm import Arena, BadHandle, DoubleFree, OutOfMemory, ProcessCache, identities, layout, stats, world
from shm.sizeclasses import CLASS_TO_SIZE, SIZE_TO_CLASS

PAGE = layout.PAGE_SIZE
SIZES = st.one_of(st.integers(1, 512), st.integers(513, 32768), st.integers(32769, 300_000))


class AllocatorModel(RuleBasedStateMachine):
    """Two Ps on one small arena; the model is a dict handle -> (size, capacity) and, per map
    index (an address, in the maps' fine part for a fine class, in their coarse part for a coarse
    class or a large block), the last handle it had: a block's handle is the next generation of
    that one."""

    def __init__(self):
        super().__init__()
        self.arena = Arena.create(unique_name("model"), 4 << 20, 4)
        self.ps = [ProcessCache(self.arena), ProcessCache(self.arena)]
        self.live = {}  # handle -> (size, capacity)
        self.freed = set()  # handles freed: stale (or a double free) for good
        self.last = {}  # map index (handle >> GEN_BITS) -> the last handle a block there had
        # Indexes whose pages may have been released since their last handle (their generation
        # is then the one the heap writes when it reserves them again), and whether a fresh
        # index may have been.
        self.regen, self.fresh_regen = set(), False
        self.mallocs = self.frees = 0
        self.prev = None

    def teardown(self):
        for p in self.ps:
            p.close()
        self.arena.destroy()

    @rule(p=st.integers(0, 1), size=SIZES)
    def alloc(self, p, size):
        self._alloc(p, size)

    def _alloc(self, p, size):
        """P p allocates `size` bytes, checked against the model: the Block, or None when full."""
        try:
            b = self.ps[p].alloc(size)
        except OutOfMemory:
            return None
        assert b.handle not in self.live, "handed out a live block twice"
        lay = self.arena.lay
        coarse = size > 32768 or layout.CLASS_COARSE[SIZE_TO_CLASS[(size + 7) >> 3]]
        assert (b.handle >> layout.GEN_BITS >= lay.handle_c0) == coarse, "a handle in the wrong part"
        off, i = lay.handle_offset(b.handle), b.handle >> layout.GEN_BITS
        for h, (_sz, cap) in self.live.items():
            o = lay.handle_offset(h)
            assert off + b.capacity <= o or o + cap <= off, "blocks overlap"
        # A fresh index has generation 0; a reused one the generation after its last handle's;
        # one whose pages were released and committed again, the generation written then.
        if i in self.last and i not in self.regen:
            assert b.handle == layout.next_handle(self.last[i])
        elif i not in self.last and not self.fresh_regen:
            assert b.handle & 255 == 0
        self.regen.discard(i)
        if size <= 32768:
            assert b.capacity == CLASS_TO_SIZE[SIZE_TO_CLASS[(size + 7) >> 3]]
        b.buf[:] = pattern(b.handle, size)
        self.live[b.handle] = (size, b.capacity)
        self.freed.discard(b.handle)  # 256 reuses of one address: its first handle comes back
        self.mallocs += 1
        return b

    @precondition(lambda self: self.live)
    @rule(p=st.integers(0, 1), data=st.data())
    def free(self, p, data):
        self._free(p, data.draw(st.sampled_from(sorted(self.live))))

    def _free(self, p, h):
        size, _ = self.live.pop(h)
        assert bytes(self.ps[p].view(h, size)) == pattern(h, size), "block contents changed"
        self.ps[p].free(h)
        self.freed.add(h)
        self.last[h >> layout.GEN_BITS] = h
        self.frees += 1

    @rule(p=st.integers(0, 1), size=st.integers(32769, 300_000))
    def hand_back(self, p, size):
        """P p allocates a large block and the other P frees it (buffered, RFREED): P p's next
        allocation of that size, its large cache holding none, takes that very block back out
        of the other P's buffer (LargeObjects.take_back)."""
        b = self._alloc(p, size)
        if b is None:
            return
        h, freer = b.handle, self.ps[1 - p]
        self._free(1 - p, h)
        waiting = h in self.arena.buffered_frees(freer.slot) and not self.ps[p]._lcache.get(-(-size // PAGE))
        c = self._alloc(p, size)
        if waiting and c is not None:
            assert c.handle == layout.next_handle(h), "the owner did not take its block back"
            assert h not in self.arena.buffered_frees(freer.slot), "its free still waits in the buffer"

    @precondition(lambda self: self.freed)
    @rule(p=st.integers(0, 1), data=st.data(), how=st.sampled_from(["free", "view"]))
    def stale_use(self, p, data, how):
        """A freed handle -- its block maybe reused since, by either P -- frees and views
        nothing: DoubleFree when it is its address's last handle and no live block covers the
        address, plain BadHandle (stale) when a live block starts there."""
        h = data.draw(st.sampled_from(sorted(self.freed)))
        lay, i = self.arena.lay, h >> layout.GEN_BITS
        off = lay.handle_offset(h)
        covered = [
            o
            for o, cap in ((lay.handle_offset(x), c) for x, (_s, c) in self.live.items())
            if o <= off < o + cap
        ]
        before = metadata_bytes(self.arena)
        with pytest.raises(BadHandle) as err:
            (self.ps[p].free if how == "free" else self.ps[p].view)(h)
        assert metadata_bytes(self.arena) == before
        if covered == [off]:
            assert err.type is BadHandle and "stale" in str(err.value)
        elif not covered and how == "free" and self.last[i] == h and i not in self.regen:
            assert err.type is DoubleFree

    @precondition(lambda self: self.live)
    @rule(data=st.data(), delta=st.sampled_from([1, 8, 16, -8, 256]))
    def bad_interior_free(self, data, delta):
        """A handle a few bytes into a live block (in the maps' fine part, whatever the block's
        part), or one index on in its own part, or another generation, frees nothing."""
        h = data.draw(st.sampled_from(sorted(self.live)))
        lay = self.arena.lay
        bad = (
            lay.make_handle(lay.handle_offset(h) + delta, h & layout.GEN_MASK, 1)
            if delta in (8, 16, -8)
            else h + delta
        )
        if bad in self.live:
            return
        before = metadata_bytes(self.arena)
        with pytest.raises(BadHandle):
            self.ps[0].free(bad)
        assert metadata_bytes(self.arena) == before

    @rule(p=st.integers(0, 1))
    def flush_one(self, p):
        self.ps[p].flush()

    @rule(p=st.integers(0, 1), full=st.booleans())
    def apply_buffer(self, p, full):
        """A P applies its remote-free buffer: whole (as when its large frees' pages reach their
        bound), or as when it is full -- the large frees their owner may take back kept."""
        with self.ps[p]._lock:
            if full:
                self.ps[p]._apply_full()
            else:
                self.arena.apply_buffered_frees(self.ps[p].slot)

    @rule(p=st.integers(0, 1))
    def stopped_and_flushed_by_the_daemon(self, p):
        """The daemon stops P p from its side and flushes its cache while the P is outside the
        allocator (shm/world.py): the P's local lists go stale, and its next call resyncs."""
        stw = world.StopTheWorld(self.arena, asymmetric=False)
        stw.begin(self.arena.q[layout.HDR["epoch"]] + 1)
        self.arena.flush_slots([self.ps[p].slot], keep_empty=True)
        stw.end({self.ps[p].slot})

    @rule(p=st.integers(0, 1), size=SIZES, data=st.data())
    def flushed_while_waiting_for_a_lock(self, p, size, data):
        """P p allocates (or frees one of the live blocks), and when that call waits for its first
        lock outside the call (Op.acquire's gate), the daemon stops and flushes P p meanwhile:
        the call lets the lock go with nothing written, resyncs, and starts again."""
        P, locks = self.ps[p], self.arena.locks
        fired = []

        def raw_acquire(lid, _orig=locks.raw_acquire):
            # Outside the call, the P lock held: the gate's wait (a daemon's flush runs with
            # the P lock free).
            if not fired and P._inside[0] == 0 and P._lock.locked():
                fired.append(lid)
                self.stopped_and_flushed_by_the_daemon(p)
            return _orig(lid)

        locks.raw_acquire = raw_acquire
        try:
            if self.live and data.draw(st.booleans()):
                self._free(p, data.draw(st.sampled_from(sorted(self.live))))
            else:
                self._alloc(p, size)
        finally:
            del locks.raw_acquire
        if fired:
            assert P._flush_gen == self.arena.q[self.arena.lay.slot_word(P.slot) + layout.SLOT["flush_gen"]]

    @rule()
    def release(self):
        self.arena.scavenge()
        self._released()

    def _released(self):
        live = {h >> layout.GEN_BITS for h in self.live}
        self.regen |= {i for i in self.last if i not in live}
        self.fresh_regen = True

    @rule(pages=st.integers(1, 40), keep=st.integers(0, 64), spans=st.integers(1, 3))
    def scavenger_step(self, pages, keep, spans):
        """One bounded background step: the oldest idle spans, a long one split."""
        self.arena.scavenge_step(max_pages=pages, keep_pages=keep, max_spans=spans, background=True)
        self._released()

    @rule()
    def snapshot(self):
        snap = self.arena.update_stats(stopped=[p.slot for p in self.ps])
        assert identities(snap) == []
        assert stats.diff(snap, stats.read_stats_slow(self.arena)) == []
        assert snap["heap_objects"] == len(self.live)
        assert snap["mallocs"] == self.mallocs and snap["frees"] == self.frees
        if self.prev:
            assert stats.monotonic(self.prev, snap) == []
        self.prev = snap

    @invariant()
    def slow_walk_agrees_with_model(self):
        slow = stats.read_stats_slow(self.arena)
        assert identities(slow) == []
        assert slow["heap_objects"] == len(self.live)
        assert slow["mallocs"] == self.mallocs and slow["frees"] == self.frees
        assert slow["heap_alloc"] == sum(cap for _, cap in self.live.values())

    @invariant()
    def structures_hold(self):
        assert self.arena.check_all() == []

    @invariant()
    def every_page_it_may_touch_is_reserved(self):
        assert unreserved(self.arena) == []


TestAllocatorModel = AllocatorModel.TestCase
TestAllocatorModel.settings = settings(
    max_examples=40, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- page heap tables ------------------------------------------------------------------------
# Each row: operations, then the expected tiling of the committed heap as (npages, state) runs,
# F = free, U = in use.  Operations: ("a", name, npages) allocates a span; ("f", name) frees it.
# The heap commits at least GROW_PAGES (128) pages at a time.
HEAP_TABLE = [
    ("first alloc grows", [("a", "x", 1)], [(1, "U"), (127, "F")]),
    ("split and reuse", [("a", "x", 3), ("a", "y", 2)], [(3, "U"), (2, "U"), (123, "F")]),
    ("free coalesces right", [("a", "x", 3), ("a", "y", 2), ("f", "y")], [(3, "U"), (125, "F")]),
    (
        "free coalesces left",
        [("a", "x", 3), ("a", "y", 2), ("a", "z", 1), ("f", "x"), ("f", "y")],
        [(5, "F"), (1, "U"), (122, "F")],
    ),
    (
        "free coalesces both sides",
        [("a", "x", 3), ("a", "y", 2), ("a", "z", 1), ("f", "x"), ("f", "z"), ("f", "y")],
        [(128, "F")],
    ),
    (
        "hole reused first fit by bucket",
        [("a", "x", 4), ("a", "y", 1), ("f", "x"), ("a", "z", 2)],
        [(2, "U"), (2, "F"), (1, "U"), (123, "F")],
    ),
    ("grow past a chunk", [("a", "x", 100), ("a", "y", 100)], [(100, "U"), (100, "U"), (56, "F")]),
    ("grow merges with free tail", [("a", "x", 120), ("a", "y", 20)], [(120, "U"), (20, "U"), (116, "F")]),
    ("big request grows by itself", [("a", "x", 300)], [(300, "U")]),
    ("free everything", [("a", "x", 300), ("a", "y", 7), ("f", "x"), ("f", "y")], [(428, "F")]),
]


def tiling(arena):
    return [(r["npages"], "U" if r["state"] == layout.SPAN_INUSE else "F") for r in arena.heap.span_records()]


@pytest.mark.parametrize("name,ops,after", HEAP_TABLE, ids=[r[0] for r in HEAP_TABLE])
def test_page_heap_table(make_arena, name, ops, after):
    arena = make_arena(heap_max=8 << 20)
    assert tiling(arena) == []  # before: nothing committed
    spans = {}

    for op in ops:

        def step(o, op=op):
            o.acquire(layout.LOCK_HEAP)
            if op[0] == "a":
                spans[op[1]] = arena.heap.alloc_span(o, op[2], 0, 1)
            else:
                arena.heap.free_span(o, spans.pop(op[1]))

        arena.run(arena.daemon_actor, step)
    assert tiling(arena) == after
    assert arena.check_all(parts=("locks", "heap")) == []  # raw spans: no objects to check


def test_page_heap_release_and_recommit_table(make_arena):
    arena = make_arena(heap_max=8 << 20)
    spans = {}

    def run(fn):
        def step(o):
            o.acquire(layout.LOCK_HEAP)
            return fn(o)

        return arena.run(arena.daemon_actor, step)

    spans["x"] = run(lambda o: arena.heap.alloc_span(o, 10, 0, 1))
    spans["y"] = run(lambda o: arena.heap.alloc_span(o, 10, 0, 1))
    run(lambda o: arena.heap.free_span(o, spans.pop("x")))
    assert run(lambda o: arena.heap.scavenge(o, 1 << 20)) == 10 + 108  # pages
    assert [(r["npages"], r["released"]) for r in arena.heap.span_records()] == [(10, 1), (10, 0), (108, 1)]
    # Reusing a released span re-commits what it takes; the rest stays released.
    spans["z"] = run(lambda o: arena.heap.alloc_span(o, 4, 0, 1))
    assert [(r["npages"], r["released"]) for r in arena.heap.span_records()] == [
        (4, 0),
        (6, 1),
        (10, 0),
        (108, 1),
    ]
    assert arena.q[arena.lay.heap_word() + layout.HEAP["released_pages"]] == 6 + 108
    # Freeing next to released spans: released and unreleased neighbours stay apart (a merge
    # would commit the released pages again).
    run(lambda o: arena.heap.free_span(o, spans.pop("y")))
    assert [(r["npages"], r["released"]) for r in arena.heap.span_records()] == [
        (4, 0),
        (6, 1),
        (10, 0),
        (108, 1),
    ]
    assert arena.check_all(parts=("locks", "heap")) == []
    # ... until an allocation fits only in their union: the run is merged (released pages
    # committed again), not the heap grown.
    spans["w"] = run(lambda o: arena.heap.alloc_span(o, 120, 0, 1))
    assert [(r["npages"], r["released"]) for r in arena.heap.span_records()] == [(4, 0), (120, 0), (4, 0)]
    assert arena.q[arena.lay.heap_word() + layout.HEAP["released_pages"]] == 0
    assert arena.q[arena.lay.heap_word() + layout.HEAP["committed_pages"]] == 128
    assert arena.check_all(parts=("locks", "heap")) == []
