"""Worker bodies for the multi-process tests (importable, so `spawn` children can run them).

Every block is filled with a pattern derived from its handle and verified before it is freed,
so two processes that were handed overlapping blocks fail the verification."""

import signal
import time

from service.demo import run_workload  # noqa: F401 - the workload the demo runs too


def arena_worker(arena_name, idx, n_ops, seed, inbox, outbox, results, progress=None, progress_at=None):
    from shm import Arena, ProcessCache

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    res = run_workload(p, idx, n_ops, seed, inbox, outbox, progress, progress_at)
    p.close()
    arena.close()
    results.put(res)


def stop_forever(ready):
    """Tell the test we are where it wants us (`ready`), and wait there for its SIGKILL."""
    ready.set()
    while True:
        signal.pause()


def halfway(real_wset, ready, before=None):
    """An Op.wset that stops forever half way through its step: its log entry complete, half
    of its words stored (wset stores word j once it has drawn value j: we stop before drawing
    one).  `before()`, if given, runs just before we stop."""

    def half_wset(self, idxs, values):
        def stored():
            for j, v in enumerate(values):
                if j == len(idxs) // 2:
                    if before is not None:
                        before()
                    stop_forever(ready)
                yield v

        real_wset(self, idxs, stored())

    return half_wset


def stuck_in_critical_section(arena_name, where, ready):
    """Attach, then stop forever INSIDE an operation -- locks held, undo log half full -- at
    `where` ("heap": after a large allocation's writes; "central": after a refill's collect;
    "release": after a free span's heap pages were given back, before its allocation map;
    "fine": after the fine-map pages of a span of a fine class were reserved afresh, their
    generations and flags written, the pages having been given back before).
    The test SIGKILLs us there."""
    from shm import Arena, ProcessCache

    arena = Arena.attach(arena_name)
    _stop_inside(ProcessCache(arena), where, ready)


def _stop_inside(p, where, ready):
    """P `p` allocates, and stops forever inside the operation (see stuck_in_critical_section)."""
    from shm.central import CentralList
    from shm.heap import PageHeap

    if where == "heap":
        real = PageHeap.alloc_span

        def alloc_span(self, op, *a):
            r = real(self, op, *a)
            stop_forever(ready)
            return r

        PageHeap.alloc_span = alloc_span
        p.alloc(100_000)
    elif where == "fine":
        p.free(p.alloc(1 << 20))
        p.flush()
        p.arena.scavenge(p.slot)  # every idle page given back, with its fine-map pages
        real = PageHeap._reserve_fine

        def reserve_fine(self, op, start, npages):
            before = self.hget("fine_map_pages")
            real(self, op, start, npages)
            if self.hget("fine_map_pages") != before:
                stop_forever(ready)

        PageHeap._reserve_fine = reserve_fine
        p.alloc(160)
    elif where == "release":
        p.free(p.alloc(1 << 20))
        p.flush()  # the span goes back to the page heap, free

        class Madvise:
            def __init__(self, mm):
                self.mm = mm

            def madvise(self, *a):
                self.mm.madvise(*a)
                stop_forever(ready)

        p.arena.mmap = Madvise(p.arena.mmap)
        p.arena.scavenge(p.slot)
    else:
        real_collect = CentralList.collect

        def collect(self, op, c, r, k):
            got = real_collect(self, op, c, r, k)
            stop_forever(ready)
            return got

        CentralList.collect = collect
        p.alloc(64)
    time.sleep(60)  # not reached


def observer(endpoint, n, results, slow=True):
    """A process that holds no P: take `n` snapshots and judge each one."""
    import client
    from shm import stats

    problems, pauses, nums, prev = [], [], set(), None
    for _ in range(n):
        snap = client.stats(endpoint, slow=slow)
        if not snap["consistent"]:
            problems.append(f"snapshot {snap['epoch']}: not consistent, unflushed {snap['unflushed']}")
        problems += [f"snapshot {snap['epoch']}: {p}" for p in stats.identities(snap)]
        if slow and not snap["slow_equal"]:
            problems.append(f"snapshot {snap['epoch']}: fast != slow: {snap['slow_diff']}")
        if prev is not None:
            problems += [f"snapshot {snap['epoch']}: {p}" for p in stats.monotonic(prev, snap)]
            if snap["epoch"] <= prev["epoch"]:
                problems.append(f"epoch went from {prev['epoch']} to {snap['epoch']}")
        prev = snap
        pauses.append(snap["pause_ns"])
        nums.add(snap["num_p"])
    results.put(
        {
            "n": n,
            "problems": problems[:20],
            "pauses": pauses,
            "num_p": sorted(nums),
            "mallocs": prev["mallocs"],
        }
    )


def stuck_worker(endpoint, ready, release, results):
    """Connect, allocate, then sit INSIDE the allocator (holding the P lock) until released:
    a worker stuck in a long call, which cannot park."""
    import client

    heap = client.connect(endpoint)
    b = heap.alloc(100)
    with heap._lock:
        heap._enter()  # inside an allocator call, as a long slow path is
        ready.set()
        release.wait(120)
        heap._leave()
    heap.free(b)
    results.put(heap.slot)
    heap.close()


def preempted_worker(endpoint, ready, results):
    """Connect, then sit INSIDE the allocator until the daemon lends it its real-time priority
    (a call the scheduler preempted, as the daemon sees it), and only then leave it.  Reports
    (policy while inside, policy after the pause) -- or ("never lent", ...) past the deadline."""
    import os
    import time

    import client

    heap = client.connect(endpoint)
    b = heap.alloc(100)
    heap.free(b)
    with heap._lock:
        heap._enter()
        ready.set()
        end = time.monotonic() + 15
        while os.sched_getscheduler(0) != os.SCHED_FIFO and time.monotonic() < end:
            pass  # busy: a call in progress, as far as anyone can tell
        inside = os.sched_getscheduler(0)
        heap._leave()
    b = heap.alloc(100)  # parks until the pause ends
    after = os.sched_getscheduler(0)
    heap.free(b)
    results.put((inside, after))
    heap.close()


def gil_held_elsewhere_worker(endpoint, ready, results):
    """Connect, then sit INSIDE the allocator waiting for the GIL, which another thread of this
    process holds -- as a call does when the control thread takes the GIL for its heartbeat.
    The switch interval is set far past any deadline, so the holder keeps the GIL until it lets
    it go itself: only once the daemon lent it the real-time priority too (or past 15 s).
    Reports (the holder's policy when it let go, the main thread's after the pause, the
    holder's after the pause)."""
    import os
    import sys
    import threading
    import time

    import client

    heap = client.connect(endpoint)
    b = heap.alloc(100)
    heap.free(b)
    go, done, seen = threading.Event(), threading.Event(), {}

    def holder():
        seen["tid"] = threading.get_native_id()
        go.wait()  # then holds the GIL: a busy loop that never blocks
        end = time.monotonic() + 15
        while os.sched_getscheduler(0) != os.SCHED_FIFO and time.monotonic() < end:
            pass
        seen["policy"] = os.sched_getscheduler(0)
        done.wait(60)  # lets the GIL go

    t = threading.Thread(target=holder)
    t.start()
    sys.setswitchinterval(1000)
    with heap._lock:
        heap._enter()
        ready.set()  # first: a set that blocks lets the GIL go too, and the holder must not have it yet
        go.set()
        time.sleep(0.05)  # lets the GIL go: the holder takes it, and we wait for it, inside the call
        heap._leave()
    sys.setswitchinterval(0.005)
    b = heap.alloc(100)  # parks until the pause ends
    after = os.sched_getscheduler(0)
    holder_after = os.sched_getscheduler(seen["tid"])
    done.set()
    t.join()
    heap.free(b)
    results.put((seen["policy"], after, holder_after))
    heap.close()


def holding_a_lock_worker(arena_name, ready, out, lid, done):
    """Claim a P and, outside any allocator call, hold arena lock `lid` in an operation of ours
    (its dirty word names us) until we run SCHED_FIFO, or 30 s: a process the scheduler
    preempted while it held a lock, as the daemon sees it.  Reports our policy when we let go,
    then, once `done` is set, our policy then."""
    import os

    from shm import Arena, ProcessCache

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)

    def hold(op):
        op.acquire(lid)
        ready.set()
        end = time.monotonic() + 30
        while os.sched_getscheduler(0) != os.SCHED_FIFO and time.monotonic() < end:
            pass  # busy, the lock held
        return os.sched_getscheduler(0)

    out.put(arena.run(p.slot, hold))
    done.wait(120)
    out.put(os.sched_getscheduler(0))
    p.close()
    arena.close()


def held_inside_worker(endpoint, ready, go, results):
    """Connect, then sit INSIDE the allocator (asleep, as a call waiting for a lock would) until
    `go` is set, and only then leave it.  Reports the handle it allocated after (once the pause
    that caught it inside ended)."""
    import client

    heap = client.connect(endpoint)
    with heap._lock:
        heap._enter()
        ready.set()
        go.wait(120)
        heap._leave()
    b = heap.alloc(100)  # parks until the pause ends
    heap.free(b)
    results.put(("ok", b.handle))
    heap.close()


def connected_worker(endpoint, cmds, results):
    """A P driven by the test through a queue: ("alloc", size) / ("free", handle) / ("verify",
    handle, size: the block still holds its pattern) / ("close",).  Answers every command on
    `results`."""
    import client

    heap = client.connect(endpoint)
    results.put(("slot", heap.slot))
    while True:
        cmd = cmds.get(timeout=120)
        try:
            if cmd[0] == "alloc":
                b = heap.alloc(cmd[1])
                from service.demo import pattern

                b.buf[:] = pattern(b.handle, b.size)
                results.put(("ok", b.handle))
            elif cmd[0] == "free":
                heap.free(cmd[1])
                results.put(("ok", None))
            elif cmd[0] == "verify":
                from service.demo import verify

                verify(heap, cmd[1], cmd[2], "connected worker")
                results.put(("ok", None))
            elif cmd[0] == "close":
                heap.close()
                results.put(("ok", None))
                return
        except Exception as e:  # reported to the test
            results.put(("error", f"{type(e).__name__}: {e}"))


def stuck_applying_frees(arena_name, ready, results, nth=1, moving=False, large=0):
    """Two Ps in one process: the first allocates, the second frees every block (a remote free)
    until its buffer fills and is applied -- and stops forever INSIDE that batch's operation,
    after the `nth` span's frees were written (the spans before it checkpointed); with `moving`,
    half way through the step that moves the first span the batch emptied from the full list to
    the partial one (PageHeap.list_move: its log entry complete, half of its words stored).  The
    first `large` blocks are large ones (100 000 B), whose frees the apply keeps in the buffer
    for their owner.  The test SIGKILLs us there."""
    from shm import Arena, ProcessCache, layout
    from shm.central import CentralList
    from shm.heap import PageHeap
    from shm.locks import Op

    arena = Arena.attach(arena_name)
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    n = layout.RFREE_CAP + 1
    blocks = [owner.alloc(100_000) for _ in range(large)] + [owner.alloc(64) for _ in range(n - large)]
    real, real_move, real_wset = CentralList.apply_frees, PageHeap.list_move, Op.wset

    calls = []

    def apply_frees(self, op, c, r, handles, k):
        bad = real(self, op, c, r, handles, k)
        calls.append(r)
        if len(calls) < nth:
            return bad
        results.put((n, layout.RFREE_CAP))
        stop_forever(ready)
        return bad  # not reached

    half_wset = halfway(real_wset, ready, lambda: results.put((n, layout.RFREE_CAP)))

    def list_move(self, op, from_w, to_w, r, tag, *a):
        if tag == layout.LIST_PARTIAL:
            Op.wset = half_wset
        return real_move(self, op, from_w, to_w, r, tag, *a)

    if moving:
        PageHeap.list_move = list_move
    else:
        CentralList.apply_frees = apply_frees
    for b in blocks:
        freer.free(b)  # the last one applies the full buffer first
    time.sleep(60)  # not reached


def stuck_applying_large_frees(arena_name, ready, handles, nth):
    """Free the large blocks whose handles come on `handles` (another P's), every one buffered
    (the bound of such frees a buffer holds lifted), then flush -- and stop forever INSIDE the
    flush, right after the `nth` of them was applied (arena.LARGE_STEP a step: the steps before
    it checkpointed, the buffer's count below them).  The test SIGKILLs us there."""
    from shm import Arena, ProcessCache, cache
    from shm.large import LargeObjects

    arena = Arena.attach(arena_name)
    cache.LARGE_RFREE_BYTES = 1 << 50  # read when the cache is made (a quarter of the heap, still)
    p = ProcessCache(arena)
    real, calls = LargeObjects.free, []

    def free(self, *a, **kw):
        res = real(self, *a, **kw)
        calls.append(res)
        if len(calls) == nth:
            stop_forever(ready)
        return res

    for h in handles.get(timeout=120):
        p.free(h)
    LargeObjects.free = free
    p.flush()
    time.sleep(60)  # not reached


def stuck_folding_frees(arena_name, ready, results, where):
    """Two Ps in one process: the owner allocates 100 blocks of 64 B (one span, which it caches),
    the freer frees the first 60 (buffered, hinted RFREED in a span the owner caches).  Then both
    are flushed in one operation, as a pause flushes them, and we stop forever INSIDE the step
    that uncaches the owner's span and applies the freer's frees with it: after its generation
    bytes were written (`where` "generations"), or after the whole step, before its checkpoint
    ("step").  Puts (the freed handles, the freer's slot) on `results` first.  The test SIGKILLs
    us there."""
    from shm import Arena, ProcessCache
    from shm.central import CentralList
    from shm.locks import Op

    arena = Arena.attach(arena_name)
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(100)]
    for b in blocks[:60]:
        freer.free(b)
    results.put(([b.handle for b in blocks[:60]], freer.slot))

    if where == "generations":
        real_wrun = Op.wrun

        def wrun(self, *args):
            real_wrun(self, *args)
            stop_forever(ready)

        Op.wrun = wrun
    else:
        real_uncache = CentralList.uncache_span

        def uncache_span(self, op, c, r, k, keep_empty=False, frees=(), *args, **kw):
            got = real_uncache(self, op, c, r, k, keep_empty, frees, *args, **kw)
            if frees:
                stop_forever(ready)
            return got

        CentralList.uncache_span = uncache_span
    arena.flush_slots([owner.slot, freer.slot], keep_empty=True)
    time.sleep(60)  # not reached


def stuck_flushing_large(arena_name, ready):
    """Allocate three large blocks, free two (kept in the P's large cache), then flush -- and
    stop forever INSIDE the flush, after the first span went back to the heap."""
    from shm import Arena, ProcessCache
    from shm.large import LargeObjects

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    blocks = [p.alloc(100_000) for _ in range(3)]
    p.free(blocks[0])
    p.free(blocks[1])
    real = LargeObjects._give_back

    def give_back(self, op, *a, **kw):
        real(self, op, *a, **kw)
        stop_forever(ready)

    LargeObjects._give_back = give_back
    p.flush()
    time.sleep(60)  # not reached


def stuck_taking_back_its_span(arena_name, ready, out):
    """Two Ps in one process allocate eight blocks of 64 B each (every block filled with its
    pattern) and are flushed together, as a pause flushes them: their spans wait on the partial
    list, the second P's at its head.  The first P's next refill takes its own span back out of
    the middle of the list (CentralList.cache_span, the slot's hint) -- and we stop forever in
    that step: its log entry complete, half of its words stored.  Puts (the blocks' handles, the
    first P's slot, its span) on `out` first.  The test SIGKILLs us there."""
    from service.demo import pattern
    from shm import Arena, ProcessCache
    from shm.central import CentralList
    from shm.locks import Op
    from shm.sizeclasses import SIZE_TO_CLASS

    arena = Arena.attach(arena_name)
    a, b = ProcessCache(arena), ProcessCache(arena)
    blocks = [p.alloc(64) for p in (a, b) for _ in range(8)]
    for blk in blocks:
        blk.buf[:] = pattern(blk.handle, blk.size)
    r = dict(arena.cached_spans(a.slot))[SIZE_TO_CLASS[64 >> 3]]
    arena.flush_slots([a.slot, b.slot], keep_empty=True, disown=False)
    out.put(([blk.handle for blk in blocks], a.slot, r))
    real_cache, real_wset = CentralList.cache_span, Op.wset

    half_wset = halfway(real_wset, ready)

    def cache_span(self, op, c, k):
        Op.wset = half_wset  # its first step: the span off the partial list, the hint spent
        return real_cache(self, op, c, k)

    CentralList.cache_span = cache_span
    a.alloc(64)
    time.sleep(60)  # not reached


def stuck_in_pending_list(arena_name, ready, handles, where):
    """Stop forever in the middle of a step that moves a large span between a P's lists (one
    Op.wset, PageHeap.list_move): its log entry complete, half of its words stored -- the span
    off one list, maybe not yet on the other.  `where`: "free" -- free the large blocks whose
    handles come on `handles` (another P's) and apply them: stuck marking one PENDING;
    "collect" -- allocate three large blocks, send their handles, wait until another P freed
    them (PENDING for us), then allocate: stuck taking one back."""
    from shm import Arena, ProcessCache
    from shm import layout as L
    from shm.heap import PageHeap
    from shm.locks import Op

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    real_move, real_wset = PageHeap.list_move, Op.wset
    tag = L.LIST_LPENDING if where == "free" else L.LIST_LARGE

    half_wset = halfway(real_wset, ready)

    def list_move(self, op, from_w, to_w, r, t, *a, **kw):
        if t == tag:
            Op.wset = half_wset
        return real_move(self, op, from_w, to_w, r, t, *a, **kw)

    if where == "free":
        for h in handles.get(timeout=120):
            p.free(h)
        PageHeap.list_move = list_move
        p.flush()
    else:
        blocks = [p.alloc(100_000) for _ in range(3)]
        handles.put([b.handle for b in blocks])
        while not arena.q[arena.lay.slot_word(p.slot) + L.SLOT["lg_pending"]]:
            time.sleep(0.001)
        PageHeap.list_move = list_move
        p.alloc(100_000)


def stuck_taking_back(arena_name, ready, handles, where):
    """Allocate three large blocks (each filled with its pattern), send their handles, wait
    until another P has freed them all (in its buffer, RFREED), then allocate again: we take
    them back out of its buffer (LargeObjects.take_back), all three in one step -- and stop
    forever inside it.  `where`: "half" -- its words entry complete, half of its words stored
    (the buffer's entries 0, our counts not yet); "bytes" -- its words stored, its map bytes not
    yet.  The test SIGKILLs us there."""
    from service.demo import pattern
    from shm import Arena, ProcessCache
    from shm import layout as L
    from shm.large import LargeObjects
    from shm.locks import Op

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    blocks = [p.alloc(100_000) for _ in range(3)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    handles.put([b.handle for b in blocks])
    while any(arena.mv[arena.lay.amap_byte(b.handle)] != L.RFREED for b in blocks):
        time.sleep(0.001)
    real_take, real_wset, real_scatter = LargeObjects.take_back, Op.wset, Op.wscatter
    calls = {"take_back": 0}

    def take_back(self, *a, **kw):
        calls["take_back"] += 1
        return real_take(self, *a, **kw)

    def wset(self, idxs, values):
        if calls["take_back"] and where == "half":
            return halfway(real_wset, ready)(self, idxs, values)
        return real_wset(self, idxs, values)

    def wscatter(self, offs, values):
        if calls["take_back"] and where == "bytes":
            stop_forever(ready)
        return real_scatter(self, offs, values)

    LargeObjects.take_back, Op.wset, Op.wscatter = take_back, wset, wscatter
    p.alloc(100_000)


def fill_and_free(endpoint, seed, nbytes, filled, go, results):
    """Connect, allocate random sizes from 1 B to 32 KiB until `nbytes`, each block filled with
    its pattern; set `filled`; on `go`, verify every block and free it; close."""
    import random

    import client
    from service.demo import pattern

    heap = client.connect(endpoint)
    rnd, blocks, total = random.Random(seed), [], 0
    while total < nbytes:
        b = heap.alloc(rnd.randint(1, 32 << 10))
        b.buf[:] = pattern(b.handle, b.size)
        blocks.append(b)
        total += b.size
    filled.set()
    assert go.wait(120), "never told to free"
    for b in blocks:
        if bytes(b.buf) != pattern(b.handle, b.size):
            raise AssertionError(f"block {b.handle} ({b.size} bytes) was overwritten")
        heap.free(b)
    heap.close()
    results.put((len(blocks), total))


def stuck_scavenging(arena_name, ready):
    """Attach, then stop forever INSIDE a scavenger step -- heap lock held, a span split and
    marked released but not yet checkpointed.  The test SIGKILLs us there."""
    from shm import Arena
    from shm import layout as L
    from shm.heap import PageHeap

    arena = Arena.attach(arena_name)
    real = PageHeap._insert_free

    def insert_free(self, op, r):
        real(self, op, r)
        if self.q[self.sw(r) + L.SPAN["released"]]:
            stop_forever(ready)

    PageHeap._insert_free = insert_free
    arena.scavenge_step(max_pages=16, keep_pages=0)


def free_stale_handle(arena_name, handle, results):
    """Another process frees (and views) a handle it was given: report what each call raised."""
    from shm import Arena, ProcessCache

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    out = []
    for call in (p.free, p.view):
        try:
            call(handle)
            out.append(None)
        except Exception as e:
            out.append((type(e).__name__, str(e)))
    out.append(arena.buffered_frees(p.slot))
    p.close()
    arena.close()
    results.put(out)


def stuck_in_fast_free(arena_name, before, ready, results, size=64, after=None):
    """Allocate a block of `size` bytes, then free it on the fast path and stop forever just
    before the statement `before` of ProcessCache's free closure (a line trace; its first one
    past the line holding `after`, if given): the test SIGKILLs us between two of the fast
    path's stores, with no lock held."""
    import inspect
    import sys

    from shm import Arena, ProcessCache

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    b = p.alloc(size)
    p.free(p.alloc(size))  # a second block, freed whole: the list is not empty when we stop
    code = p.free.__code__
    lines, first = inspect.getsourcelines(code)
    start = 0 if after is None else next(i for i, line in enumerate(lines) if after in line)
    target = first + next(i for i, line in enumerate(lines) if i > start and line.strip().startswith(before))
    results.put((p.slot, b.handle))

    def trace(frame, event, arg):
        if frame.f_code is not code:
            return None

        def line(frame, event, arg):
            if event == "line" and frame.f_lineno == target:
                stop_forever(ready)
            return line

        return line

    sys.settrace(trace)
    p.free(b)


def stuck_closing(arena_name, ready):
    """Close the arena for good (shm/world.py close_for_good) -- and stop forever INSIDE it,
    holding the registry lock, after the mark and the first P's stop byte were written."""
    from shm import Arena, layout, world

    arena = Arena.attach(arena_name)
    slots = arena.registry.active_slots()

    def first_then_stop():
        yield slots[0]
        stop_forever(ready)

    arena.registry.active_slots = lambda: first_then_stop()
    world.close_for_good(arena, layout.CLOSED_FORCED)
    time.sleep(60)  # not reached


def forking_victim(endpoint, where, how, ready, results):
    """Connect, fork a child that stays alive (as a fork-based multiprocessing.Pool does), then
    stop forever INSIDE an operation (`where` as in stuck_in_critical_section).  `how`: "python"
    forks with os.fork (its at-fork hooks run), "c" calls libc's fork() directly, as C code would
    (no Python hook runs).  Puts (child pid, slot) on `results`.  The test SIGKILLs us there and
    kills the child when it is done."""
    import ctypes
    import os

    import client

    heap = client.connect(endpoint)
    if how == "python":
        child = os.fork()
    else:
        libc = ctypes.CDLL(None)
        child = libc.fork()
        if child == 0:  # no Python hook ran: touch nothing, wait in C for the SIGKILL
            while True:
                libc.pause()
    if child == 0:
        while True:
            signal.pause()
    results.put((child, heap.slot))
    _stop_inside(heap, where, ready)


def stuck_in_batched_write(arena_name, written, ready, results):
    """A P allocates ten 64-byte blocks, keeps five, then flushes its cache -- and stops forever
    INSIDE the flush, in the middle of uncache_span's batched write (Op.wset): its log entry
    complete, the first `written` of its words stored.  Puts (word indices, new values) on
    `results` first.  The test SIGKILLs us there."""
    from shm import Arena, ProcessCache
    from shm.locks import Op

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    blocks = [p.alloc(64) for _ in range(10)]
    for b in blocks[::2]:
        p.free(b)
    real = Op.wset

    def wset(self, idxs, values):
        def stored():  # wset stores word j once it has drawn value j: stop before drawing one
            for j, v in enumerate(values):
                if j == written:
                    results.put((list(idxs), list(values)))
                    stop_forever(ready)
                yield v

        real(self, idxs, stored())

    Op.wset = wset
    p.flush()
    time.sleep(60)  # not reached


def stuck_in_claim(arena_name, where, ready):
    """Attach and claim a P slot never claimed before -- and stop forever INSIDE the claim, the
    registry lock held: `where` "reserved" right after the slot's pages were reserved, before
    anything of it is written; "written" after the claim's first words (the token is drawn
    after them).  The test SIGKILLs us there."""
    from shm import Arena, ProcessCache, registry

    def stop_here():
        ready.set()
        while True:
            signal.pause()

    arena = Arena.attach(arena_name)
    if where == "reserved":
        real = registry.reserve

        def reserve(*a):
            real(*a)
            stop_here()

        registry.reserve = reserve
    else:
        registry.os.urandom = lambda n: stop_here()
    ProcessCache(arena)
    time.sleep(60)  # not reached


def call_behind_a_lock(arena_name, what, handles, ready, go, results):
    """Take a P of arena `arena_name` that caches a span of 1000-byte blocks (one allocated),
    say so (slot, registered for membarrier); at `go`, make a call whose first operation takes
    a lock the test holds: "refill", an alloc of 64 bytes (the list of its class is empty: a
    refill, under that class's central lock); "large", an alloc of 40 000 bytes (none cached:
    the heap lock); "apply", frees of `handles` (another P's 64-byte blocks) until one finds
    the remote-free buffer full (an apply, under that class's central lock first).  Reports
    how often the P parked meanwhile, keeps its blocks filled with their handles' patterns,
    then, at the next `go`, verifies them, frees them and closes."""
    from service.demo import pattern
    from shm import Arena, ProcessCache

    arena = Arena.attach(arena_name)
    p = ProcessCache(arena)
    mine = [p.alloc(1000)]
    mine[0].buf[:] = pattern(mine[0].handle, mine[0].size)
    ready.put((p.slot, p.barrier))
    go.get(timeout=120)
    if what == "apply":
        for h in handles:
            p.free(h)
    else:
        b = p.alloc(64 if what == "refill" else 40_000)
        b.buf[:] = pattern(b.handle, b.size)
        mine.append(b)
    results.put(p.parks)
    go.get(timeout=120)
    ok = all(bytes(x.buf) == pattern(x.handle, x.size) for x in mine)
    for x in mine:
        p.free(x)
    p.close()
    arena.close()
    results.put(ok)


def _attach(where):
    """A P of the arena named `where`, or, for an endpoint ("ipc://..."), of its daemon's."""
    if "://" in where:
        import client

        heap = client.connect(where)
        return heap, heap.close
    from shm import Arena, ProcessCache

    arena = Arena.attach(where)
    p = ProcessCache(arena)

    def close():
        p.close()
        arena.close()

    return p, close


def channel_sender(where, handles, n, seed, go, results, stop_after=None, ready=None, in_loan=False):
    """Attach, make a channel of 16 slots and put its handle on `handles`; send `n` messages of
    log-uniform sizes 1 B .. 1 MiB, every other one by loan()/commit() and the rest by send(),
    each filled with pattern(handle, size).  With `stop_after`, stop forever (for the test's
    SIGKILL) once that many are sent -- with `in_loan`, inside the next loan, filled and not
    committed.  Else wait for `go`, close the channel and the P, and put [(handle, size)] sent,
    in order, on `results`."""
    import random

    from service.demo import log_uniform_size, pattern
    from shm import Channel

    p, close = _attach(where)
    ch = Channel.create(p, 16)
    handles.put(ch.handle)
    rng, sent = random.Random(seed), []
    for i in range(n):
        size = log_uniform_size(rng)
        if i == stop_after:
            if in_loan:
                ch.loan(size)[:] = bytes(size)  # filled, never committed
            stop_forever(ready)
        if i % 2:
            mv = ch.loan(size)
            h = ch.loaned_handle
            mv[:] = pattern(h, size)
            mv.release()
            ch.commit()
        else:
            b = p.alloc(size)
            h = b.handle
            b.buf[:] = pattern(h, size)
            ch.send(b)
        sent.append((h, size))
    go.wait(120)
    ch.close()
    close()
    results.put(sent)


def channel_receiver(where, handle, n, results, take_every=0, hold=0, ready=None):
    """Attach, open the channel at `handle`, receive `n` messages: each view checked against
    pattern(last_handle, its size), then released -- or, every `take_every`-th, taken, checked
    again and freed by us.  With `ready`, the last `hold` received are not released: stop
    forever there (for the test's SIGKILL).  Else close and put [(handle, size)] received, in
    order, on `results`."""
    from service.demo import pattern
    from shm import Channel

    p, close = _attach(where)
    rx = Channel.open(p, handle)
    got = []
    for i in range(n):
        mv = rx.recv(timeout=120)
        h = rx.last_handle
        assert bytes(mv) == pattern(h, len(mv)), f"message {i}: block {h} was overwritten"
        got.append((h, len(mv)))
        mv.release()
        if ready is not None and i >= n - hold:
            continue
        if take_every and i % take_every == take_every - 1:
            b = rx.take()
            assert (b.handle, b.size) == got[-1]
            assert bytes(b.buf) == pattern(h, b.size)
            p.free(b)
        else:
            rx.release()
    if ready is not None:
        stop_forever(ready)
    rx.close()
    close()
    results.put(got)


def stuck_opening_channel(arena_name, ready, out, handle):
    """Attach and open the receiving end of the channel at `handle` -- and stop forever INSIDE
    the claim, the registry lock held, our pid written and our start time not.  The test
    SIGKILLs us there."""
    from shm import Arena, Channel, ProcessCache, locks

    p = ProcessCache(Arena.attach(arena_name))
    locks.Op.wset = halfway(locks.Op.wset, ready)
    Channel.open(p, handle)


def stuck_closing_channel(arena_name, ready, out, handle):
    """Attach, open the receiving end of the channel at `handle`, receive and release one
    message, then close it -- and stop forever INSIDE the close's operation, the registry lock
    held, its closed flag written and the torn-down flag not.  The test SIGKILLs us there."""
    from shm import Arena, Channel, ProcessCache, locks

    p = ProcessCache(Arena.attach(arena_name))
    rx = Channel.open(p, handle)
    rx.recv(timeout=60)
    rx.release()
    locks.Op.wset = halfway(locks.Op.wset, ready)
    rx.close()
