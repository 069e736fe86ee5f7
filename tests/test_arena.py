"""The arena in one process: allocation, bad input, exhaustion, the seed bug, fork."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from support import assert_healthy, metadata_bytes, pattern, settle
from shm import (ArenaClosed, BadHandle, CorruptionError, DoubleFree, ForkedHeap, LayoutMismatch, OutOfMemory,
                 ProcessCache, identities, layout, read_stats, read_stats_slow)
from shm import stats as S
from shm.sizeclasses import CLASS_TO_SIZE, MAX_SMALL_SIZE, NUM_SIZE_CLASSES


def test_every_size_class_and_large(arena):
    p = ProcessCache(arena)
    blocks = []
    for c in range(1, NUM_SIZE_CLASSES):
        size = CLASS_TO_SIZE[c]
        for s in (CLASS_TO_SIZE[c - 1] + 1, size):
            b = p.alloc(s)
            assert b.capacity == size and b.size == s
            b.buf[:] = pattern(b.handle, s)
            blocks.append(b)
    for s in (MAX_SMALL_SIZE + 1, 100_000, 1 << 20):
        b = p.alloc(s)
        assert b.capacity >= s and b.capacity % layout.PAGE_SIZE == 0
        b.buf[:] = pattern(b.handle, s)
        blocks.append(b)
    spans = sorted((b.handle, b.handle + b.capacity) for b in blocks)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "blocks overlap"
    snap = settle(arena, p)
    assert snap["heap_objects"] == len(blocks)
    assert snap["large_mallocs"] == 3 and snap["large_bytes"] == sum(b.capacity for b in blocks[-3:])
    assert snap["heap_alloc"] == sum(b.capacity for b in blocks)
    assert S.check(arena) == []
    for b in blocks:
        assert bytes(p.view(b.handle, b.size)) == pattern(b.handle, b.size)
        p.free(b)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["heap_inuse"] == 0
    assert snap["mallocs"] == snap["frees"] == len(blocks)
    p.close()


def test_zero_size_gives_distinct_blocks(arena):
    p = ProcessCache(arena)
    a, b = p.alloc(0), p.alloc(0)
    assert a.handle != b.handle and a.size == 0
    p.free(a)
    p.free(b.handle)
    assert_healthy(arena, p)
    p.close()


def test_cross_process_cache_free_goes_pending_then_collected(arena):
    p1, p2 = ProcessCache(arena), ProcessCache(arena)
    blocks = [p1.alloc(64) for _ in range(10)]
    for b in blocks[:5]:
        p2.free(b)  # span cached by p1: PENDING
    # Unflushed, the slow walk already counts them free.
    slow = read_stats_slow(arena)
    assert slow["heap_objects"] == 5
    with pytest.raises(DoubleFree):
        p1.free(blocks[0])  # PENDING is free: a double free, from the owner too
    with pytest.raises(DoubleFree):
        p2.free(blocks[1])
    for b in blocks[5:]:
        p1.free(b)
    snap = assert_healthy(arena, p1, p2)
    assert snap["heap_objects"] == 0 and snap["frees"] == 10
    p1.close()
    p2.close()


BAD = [
    ("below the heap", lambda a, b: a.lay.heap_off - 8, BadHandle),
    ("past the heap", lambda a, b: a.lay.heap_off + a.lay.heap_max, BadHandle),
    ("negative", lambda a, b: -8, BadHandle),
    ("misaligned", lambda a, b: b["small"].handle + 3, BadHandle),
    ("inside a small block", lambda a, b: b["small"].handle + 8, BadHandle),
    ("inside a large block", lambda a, b: b["large"].handle + 4096, BadHandle),
    ("never allocated page", lambda a, b: a.lay.heap_off + a.lay.heap_max - 8192, BadHandle),
    ("free object", lambda a, b: b["freed"], DoubleFree),
    ("freed large", lambda a, b: b["freed_large"], BadHandle),
    ("not an int", lambda a, b: "12345", BadHandle),
    ("float", lambda a, b: float(b["small"].handle), BadHandle),
]


@pytest.mark.parametrize("what,make,exc", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("who", ["owner", "other"])
def test_bad_handles_change_nothing(arena, what, make, exc, who):
    p1, p2 = ProcessCache(arena), ProcessCache(arena)
    blocks = {"small": p1.alloc(48), "large": p1.alloc(100_000)}
    f = p1.alloc(48)
    blocks["freed"] = f.handle
    p1.free(f)
    g = p1.alloc(50_000)
    blocks["freed_large"] = g.handle
    p1.free(g)
    before = metadata_bytes(arena)
    with pytest.raises(exc):
        (p1 if who == "owner" else p2).free(make(arena, blocks))
    assert metadata_bytes(arena) == before, f"a bad free ({what}) changed the arena"
    if what not in ("not an int", "float"):
        with pytest.raises(BadHandle):
            p2.view(make(arena, blocks))
    p1.free(blocks["small"])
    p1.free(blocks["large"])
    assert_healthy(arena, p1, p2)
    p1.close()
    p2.close()


def test_double_free_across_two_processes_caches(arena):
    p1, p2 = ProcessCache(arena), ProcessCache(arena)
    b, neighbour = p1.alloc(200), p1.alloc(200)
    p1.flush()  # span uncached: b is ALLOC in a central span
    p2.free(b.handle)
    before = metadata_bytes(arena)
    for p in (p1, p2):
        with pytest.raises(DoubleFree):
            p.free(b.handle)
    assert metadata_bytes(arena) == before
    p2.free(neighbour)  # the span is empty now and back in the heap
    with pytest.raises(BadHandle, match="not a live block"):
        p1.free(neighbour.handle)
    assert_healthy(arena, p1, p2)
    p1.close()
    p2.close()


def test_out_of_memory_is_clean_and_recoverable(make_arena):
    arena = make_arena(heap_max=2 << 20)
    p = ProcessCache(arena)
    with pytest.raises(OutOfMemory):
        p.alloc(3 << 20)
    got = []
    for size in (300_000, 40_000, 8192):  # fill every page: 37-page, 5-page, then 1-page spans
        while True:
            try:
                got.append(p.alloc(size))
            except OutOfMemory:
                break
    assert len(got) > 6
    before = metadata_bytes(arena)
    for size in (300_000, 40_000, 8192, 1024, 8):
        with pytest.raises(OutOfMemory):
            p.alloc(size)
        assert metadata_bytes(arena) == before, f"a failed allocation of {size} changed the arena"
    for b in got:
        p.free(b)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0
    p.close()


def test_fallocate_enospc_is_out_of_memory(arena, monkeypatch):
    p = ProcessCache(arena)
    keep = p.alloc(64)
    before = metadata_bytes(arena)

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OutOfMemory, match="/dev/shm is full"):
        p.alloc(5 << 20)
    assert metadata_bytes(arena) == before
    monkeypatch.undo()
    p.free(keep)
    assert_healthy(arena, p)
    p.close()


FULL_SHM = textwrap.dedent("""
    from shm import Arena, ProcessCache, OutOfMemory
    a = Arena.create("shmalloc-full", 64 << 20, 4)   # reserved sparse: 64 MiB > the 4 MiB tmpfs
    p = ProcessCache(a)
    got = []
    try:
        while True:
            b = p.alloc(100_000)
            b.buf[:] = b"x" * b.size
            got.append(b)
    except OutOfMemory as e:
        print("OOM", len(got), e)
    for b in got:
        p.free(b)
    p.close()
    a.check()
    print("CHECK OK")
    a.destroy()
""")


def test_real_full_dev_shm_is_out_of_memory_not_sigbus(tmp_path):
    """A 4 MiB tmpfs mounted over /dev/shm in a private mount namespace: the heap, reserved
    at 64 MiB, must stop with OutOfMemory when tmpfs is full -- never SIGBUS."""
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {probe.stderr.decode().strip()}")
    script = tmp_path / "full.py"
    script.write_text(FULL_SHM)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        f"mount -t tmpfs -o size=4m tmpfs /dev/shm && {sys.executable} {script}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode} (SIGBUS is -7): {r.stdout} {r.stderr}"
    assert "OOM" in r.stdout and "/dev/shm is full" in r.stdout and "CHECK OK" in r.stdout


def test_seed_bug_reading_before_flushing_is_wrong(arena):
    """golang/go#38712: figures read before the caches are flushed disagree with the arena.
    Built on purpose: a P caches spans whose objects are all freed, so flushing returns them
    to the heap and changes heap_inuse, heap_idle, mspan_inuse, mallocs and frees."""
    p, other = ProcessCache(arena), ProcessCache(arena)
    keep = [p.alloc(4096) for _ in range(3)]
    gone = [p.alloc(64) for _ in range(100)] + [p.alloc(1000) for _ in range(5)]
    for b in gone:
        p.free(b)
    other_blocks = [other.alloc(64) for _ in range(10)]

    # The old order: read first, flush after -- as updatememstats did before 0ddde4ada2b1.
    stale = read_stats(arena)
    arena.flush_all(parked=[p.slot, other.slot])
    truth = read_stats_slow(arena)
    wrong = S.diff(stale, truth)
    assert wrong, "reading before the flush should have disagreed with the arena"
    assert stale["heap_inuse"] != truth["heap_inuse"]
    assert stale["frees"] != truth["frees"]
    # Mixing figures read before the flush with figures read after breaks the identities,
    # exactly as Sys != HeapSys + ... did in the Go bug.
    mixed = dict(read_stats(arena), heap_inuse=stale["heap_inuse"], heap_idle=stale["heap_idle"],
                 heap_alloc=stale["heap_alloc"])
    assert identities(mixed), "the mixed snapshot should break an identity"

    # The fixed order: flush first, then read.
    more = [p.alloc(64) for _ in range(7)]
    for b in more:
        p.free(b)
    right = arena.update_stats(parked=[p.slot, other.slot])
    assert identities(right) == []
    assert S.diff(right, read_stats_slow(arena)) == []
    assert right["heap_objects"] == len(keep) + len(other_blocks)
    for b in keep:
        p.free(b)
    for b in other_blocks:
        other.free(b)
    assert_healthy(arena, p, other)
    p.close()
    other.close()


def test_counters_never_decrease_even_with_cached_frees(arena):
    p, q = ProcessCache(arena), ProcessCache(arena)
    prev = settle(arena, p, q)
    import random
    rnd = random.Random(7)
    live = []
    for step in range(30):
        for _ in range(rnd.randint(0, 200)):
            live.append((p if rnd.random() < 0.5 else q).alloc(rnd.choice([8, 64, 500, 3000, 40_000])))
        rnd.shuffle(live)
        for _ in range(rnd.randint(0, len(live))):
            (p if rnd.random() < 0.5 else q).free(live.pop())
        cur = settle(arena, p, q)
        assert S.monotonic(prev, cur) == []
        assert identities(cur) == []
        assert cur["heap_objects"] == len(live)
        prev = cur
    assert S.check(arena) == []
    p.close()
    q.close()


def test_release_and_reuse_of_idle_pages(arena):
    p = ProcessCache(arena)
    big = [p.alloc(1 << 20) for _ in range(4)]
    for b in big:
        p.free(b)
    released = arena.release_free_pages()
    snap = settle(arena, p)
    assert released > 0 and snap["heap_released"] == released
    assert snap["heap_released"] <= snap["heap_idle"]
    again = [p.alloc(1 << 20) for _ in range(2)]
    for b in again:
        b.buf[:] = pattern(b.handle, b.size)
        assert bytes(b.buf) == pattern(b.handle, b.size)
    snap = assert_healthy(arena, p)
    assert snap["heap_released"] < released
    for b in again:
        p.free(b)
    assert_healthy(arena, p)
    p.close()


def test_layout_mismatch_refused(arena):
    from shm import Arena
    arena.q[layout.HDR["version"]] = 99
    with pytest.raises(LayoutMismatch, match="version"):
        Arena.attach(arena.name)
    arena.q[layout.HDR["version"]] = layout.VERSION
    w = arena.lay.spans_off // 8
    arena.q[w] ^= 1
    with pytest.raises(LayoutMismatch, match="spans"):
        Arena.attach(arena.name)
    arena.q[w] ^= 1
    other = Arena.attach(arena.name)
    other.close()


def test_check_names_corruption(arena):
    p = ProcessCache(arena)
    b = p.alloc(64)
    p.flush()
    off = arena.lay.amap_off + (b.handle - arena.lay.heap_off) // 8
    arena.mv[off + 1] = layout.ALLOC  # a byte outside any object start
    with pytest.raises(CorruptionError, match="allocation map"):
        arena.check()
    arena.mv[off + 1] = 0
    arena.check()
    p.free(b)
    p.close()


def test_closed_heap_refuses(arena):
    p = ProcessCache(arena)
    p.close()
    with pytest.raises(ArenaClosed):
        p.alloc(10)
    with pytest.raises(ArenaClosed):
        p.free(12345)


def test_fork_child_gets_a_clear_error(arena):
    p = ProcessCache(arena)
    b = p.alloc(100)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(r)
            try:
                p.alloc(100)
                msg = b"NO ERROR"
            except ForkedHeap as e:
                msg = b"ForkedHeap " + str(e).encode()
            try:
                p.free(b)
                msg += b" / free: NO ERROR"
            except ForkedHeap:
                msg += b" / free: ForkedHeap"
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert out.startswith(b"ForkedHeap") and out.endswith(b"free: ForkedHeap"), out
    p.free(b)  # the parent's P is untouched
    assert_healthy(arena, p)
    p.close()


def test_slots_are_reused_and_exhausted_cleanly(make_arena):
    from shm import NoFreeSlot
    arena = make_arena(nslots=2)
    a, b = ProcessCache(arena), ProcessCache(arena)
    with pytest.raises(NoFreeSlot):
        ProcessCache(arena)
    a.close()
    c = ProcessCache(arena)
    assert c.slot == a.slot
    b.close()
    c.close()
    assert arena.active_slots() == []


def test_undo_log_rolls_back_a_failed_operation(arena):
    """An exception half way through an operation leaves the arena as it was."""
    p = ProcessCache(arena)
    keep = [p.alloc(5000) for _ in range(3)]
    before = metadata_bytes(arena)

    def half(op):
        arena.alloc_large(op, 100_000)
        arena.heap.free_span  # noqa: B018 - reached: the allocation above is complete
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        arena.run(p.slot, half)
    assert metadata_bytes(arena) == before
    for b in keep:
        p.free(b)
    assert_healthy(arena, p)
    p.close()


def test_threads_sharing_one_cache_switch_it_to_shared_mode(arena):
    """The fast path belongs to the thread that made the cache; other threads may use it too,
    through the locked path, and nothing is lost or handed out twice."""
    import random
    import threading
    p = ProcessCache(arena)
    owner_blocks = [p.alloc(64) for _ in range(50)]  # the owner's fast path, before any sharing
    assert not p.shared
    errors, handed = [], []
    lock = threading.Lock()

    def work(seed):
        rnd = random.Random(seed)
        mine = []
        try:
            for _ in range(3000):
                if mine and rnd.random() < 0.5:
                    b = mine.pop(rnd.randrange(len(mine)))
                    assert bytes(b.buf) == pattern(b.handle, b.size), "a block was overwritten"
                    p.free(b)
                else:
                    b = p.alloc(rnd.choice([8, 64, 200, 3000, 40_000]))
                    b.buf[:] = pattern(b.handle, b.size)
                    mine.append(b)
                    with lock:
                        handed.append(b.handle)
            for b in mine:
                assert bytes(b.buf) == pattern(b.handle, b.size)
                p.free(b)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    work(99)  # the owner works at the same time
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert p.shared
    for b in owner_blocks:
        p.free(b)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0 and snap["mallocs"] == len(handed) + len(owner_blocks)
    p.close()


def test_huge_block_fits_the_undo_log(make_arena):
    """One operation's undo log is bounded (layout.LOG_BYTES): a block of most of the heap must
    still be allocated, found, freed and checked; so must 300 spans' worth of small objects."""
    arena = make_arena(heap_max=96 << 20)
    p = ProcessCache(arena)
    big = p.alloc(64 << 20)
    big.buf[-8:] = b"lastpage"
    with pytest.raises(BadHandle):
        p.free(big.handle + (32 << 20))  # an interior page of a large block
    small = [p.alloc(8) for _ in range(300 * 1024)]  # 300 spans of the 8-byte class
    for b in small:
        p.free(b)
    arena.flush_all(parked=[p.slot], keep_empty=True)
    assert arena.free_empty_spans() == 1  # the one span still cached at the flush
    assert bytes(p.view(big.handle)[-8:]) == b"lastpage"
    p.free(big)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0
    p.close()
