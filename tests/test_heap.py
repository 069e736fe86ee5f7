"""The page heap (shm/heap.py) in one process: exhaustion, a full /dev/shm, release and re-commit
of idle pages."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
from support import (
    assert_healthy,
    full_after,
    metadata_bytes,
    pattern,
    reserved_by_the_books,
    settle,
    unreserved,
    verify_and_free,
)

from shm import OutOfMemory, ProcessCache


def test_out_of_memory_is_clean_and_recoverable(make_arena):
    arena = make_arena(heap_max=2 << 20)
    p = ProcessCache(arena)
    with pytest.raises(OutOfMemory):
        p.alloc(3 << 20)
    got = []
    for size in (300_000, 40_000, 8192, 8):  # fill every page: 37-, 5-, 16-page spans, then 1-page ones
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


# Run in a private mount namespace with a small tmpfs over /dev/shm and a filler file in it: at
# each fill level (bytes left free), make an arena whose heap (64 MiB, reserved sparse) is far
# more than the tmpfs, allocate blocks of `size` until OutOfMemory, check the arena, verify and
# free every block; then give the idle pages back, let the filler take most of the room they
# left, and do it again (released pages and their allocation map committed again on a full
# tmpfs).  A SIGBUS anywhere kills the script.
@pytest.mark.parametrize("fail_at", range(4))
def test_a_commit_that_fails_part_way_changes_nothing(arena, monkeypatch, fail_at):
    """A growth reserves the allocation map, page map, span records and heap pages in turn; when
    /dev/shm runs out at any of them, the allocation is OutOfMemory, the arena unchanged, and a
    later one commits the same pages again from the start."""
    p = ProcessCache(arena)
    keep = p.alloc(64)
    before = metadata_bytes(arena)
    full_after(monkeypatch, fail_at)
    with pytest.raises(OutOfMemory, match="/dev/shm is full"):
        p.alloc(5 << 20)
    assert metadata_bytes(arena) == before
    monkeypatch.undo()
    b = p.alloc(5 << 20)
    b.buf[:] = pattern(b.handle, b.size)
    assert unreserved(arena) == []
    assert bytes(b.buf) == pattern(b.handle, b.size)
    p.free(b)
    p.free(keep)
    assert_healthy(arena, p)
    p.close()


FULL_SHM = textwrap.dedent("""
    import os, sys
    from service.demo import pattern
    from shm import Arena, OutOfMemory, ProcessCache, read_stats_slow

    NAME = "shmalloc-full"
    size, nslots = int(sys.argv[1]), int(sys.argv[2])
    levels = [int(n) for n in sys.argv[3].split(",")]

    def room():
        st = os.statvfs("/dev/shm")
        return st.f_bavail * st.f_frsize

    def leave_free(n):
        fd = os.open("/dev/shm/filler", os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            if room() > n:
                os.posix_fallocate(fd, 0, room() - n)
        finally:
            os.close(fd)

    def fill_and_free(a, p):
        got = []
        try:
            while True:
                b = p.alloc(size)
                b.buf[:] = pattern(b.handle, size)
                got.append(b)
        except OutOfMemory as e:
            assert "/dev/shm is full" in str(e), e
        a.check()  # clean right after the OutOfMemory, the P's cache as it is
        for b in got:
            assert bytes(b.buf) == pattern(b.handle, size), b
            p.free(b)
        p.flush()
        a.free_empty_spans()
        a.check()
        assert read_stats_slow(a)["heap_objects"] == 0
        return len(got)

    for free in levels:
        leave_free(free)
        try:
            a = Arena.create(NAME, 64 << 20, nslots)
        except OutOfMemory as e:
            assert "/dev/shm is full" in str(e) and "fixed regions" in str(e), e
            assert os.listdir("/dev/shm") == ["filler"], os.listdir("/dev/shm")  # nothing left behind
            print("CREATE-OOM", free, e, flush=True)
            continue
        before = os.pread(a.fd, a.lay.spans_off, 0)  # pread: reads a hole without filling it
        try:
            p = ProcessCache(a)  # its claim reserves slot 0 and its undo log
        except OutOfMemory as e:
            assert "/dev/shm is full" in str(e) and "P slot 0" in str(e), e
            assert os.pread(a.fd, a.lay.spans_off, 0) == before  # the registry as it was
            assert a.registry.active_slots() == [] and a.check_all() == []
            print("CLAIM-OOM", free, flush=True)
            a.destroy()
            continue
        n1 = fill_and_free(a, p)
        released = a.scavenge()
        leave_free(released // 3 + free % 65536)  # room for part of what was given back
        n2 = fill_and_free(a, p)
        print("LEVEL", free, n1, released, n2, flush=True)
        p.close()
        a.destroy()
    os.unlink("/dev/shm/filler")
""")


def run_on_small_dev_shm(tmp_path, script, tmpfs_size, *args):
    """Run `script` with args in a private mount namespace, a `tmpfs_size` tmpfs mounted over
    /dev/shm; skip when this machine cannot make one."""
    ns = ["unshare", "--mount", "--propagation", "private", "sh", "-c"]
    probe = subprocess.run([*ns, "mount -t tmpfs -o size=1m tmpfs /dev/shm"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a mount namespace here: {probe.stderr.decode().strip()}")
    path = tmp_path / "script.py"
    path.write_text(script)
    cmd = " ".join([sys.executable, str(path), *map(str, args)])
    r = subprocess.run(
        [*ns, f"mount -t tmpfs -o size={tmpfs_size} tmpfs /dev/shm && {cmd}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"exit {r.returncode} (SIGBUS is -7 or 135): {r.stdout} {r.stderr}"
    return r.stdout.splitlines()


# Bytes left free in a 3 MiB tmpfs, 24 levels: from less than an arena's fixed regions (~180 KiB),
# through room for them but not for the first claim's slot (68 KiB with its undo log), through
# the heap's first growth (a page of span records, 1 MiB of pages and 257 KiB of their table
# entries) at 18 levels spaced unevenly -- so that the reservation that fails is the records',
# the heap pages', their allocation map's, generation map's or page map's at others -- then 6
# with room for one growth.
LEVELS = [100_000 + i * 85_000 + (i * 7 % 16) * 4096 for i in range(18)]
LEVELS += [1_700_000 + i * 190_000 + (i * 5 % 16) * 4096 for i in range(6)]


@pytest.mark.parametrize("size", [16, 100_000])
def test_real_full_dev_shm_is_out_of_memory_not_sigbus(tmp_path, size):
    """A full tmpfs at 24 fill levels: every allocation ends in OutOfMemory, never SIGBUS, the
    arena checks clean after each, every block keeps its pattern and frees; so again after the
    idle pages were given back and the room they left taken."""
    out = run_on_small_dev_shm(tmp_path, FULL_SHM, "3m", size, 4, ",".join(map(str, LEVELS)))
    levels = [line.split() for line in out if line.startswith("LEVEL")]
    assert len(levels) + sum(line.startswith(("CREATE-OOM", "CLAIM-OOM")) for line in out) == len(LEVELS), out
    assert [line.split()[0] for line in out[:2]] == ["CREATE-OOM", "CLAIM-OOM"], out
    assert len(levels) >= 20, out
    got = [int(lv[2]) for lv in levels]
    assert got == sorted(got) and got[0] == 0 and got[-1] > 0, out  # more room, more blocks
    assert any(int(lv[3]) > 0 and int(lv[4]) > 0 for lv in levels), out  # released pages reused


def test_arena_creation_and_first_claim_on_a_too_small_dev_shm(tmp_path):
    """An arena whose fixed regions (about 180 KiB whatever its slot count: the worker slots are
    reserved at their first claim) do not fit in /dev/shm is refused with OutOfMemory at creation,
    and no segment is left behind; with room for them but not for a slot (68 KiB with its undo
    log), the first claim is OutOfMemory naming /dev/shm and the slot, the registry unchanged;
    with room for both, a 64-slot arena on a 3 MiB /dev/shm works."""
    out = run_on_small_dev_shm(tmp_path, FULL_SHM, "3m", 16, 64, "0,4096,100000,170000,200000,250000,600000")
    assert [line.split()[:2] for line in out] == [
        *(["CREATE-OOM", n] for n in ("0", "4096", "100000", "170000")),
        *(["CLAIM-OOM", n] for n in ("200000", "250000")),
        ["LEVEL", "600000"],
    ], out
    assert all("fixed regions" in line for line in out[:4]), out


def test_release_and_reuse_of_idle_pages(arena):
    p = ProcessCache(arena)
    big = [p.alloc(1 << 20) for _ in range(4)]
    for b in big:
        p.free(b)
    p.flush()  # the P's large cache keeps freed spans for reuse until it is flushed
    released = arena.scavenge()
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


DAEMON_ON_SMALL_SHM = textwrap.dedent("""
    import os, subprocess, sys
    sock = os.path.join(sys.argv[1], "d.sock")
    cmd = [sys.executable, "-m", "service", "daemon", "--endpoint", "ipc://" + sock, "--max-heap", sys.argv[2]]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    print("EXIT", r.returncode, os.listdir("/dev/shm"), os.path.exists(sock))
    print(r.stdout, r.stderr)
""")


def test_daemon_refuses_to_start_on_a_dev_shm_too_small_for_its_fixed_regions(tmp_path):
    """--max-heap fits (it is reserved sparse), the fixed regions (176 KiB) do not: on a 160 KiB
    /dev/shm the daemon says so and leaves nothing."""
    out = run_on_small_dev_shm(tmp_path, DAEMON_ON_SMALL_SHM, "160k", tmp_path, "64K")
    assert out[0] == "EXIT 2 [] False", out
    text = "\n".join(out)
    assert "/dev/shm is full" in text and "fixed regions" in text, out


def resident(arena):
    """Bytes of the segment tmpfs holds."""
    return os.fstat(arena.fd).st_blocks * 512


def test_release_gives_back_the_allocation_map_with_the_pages(make_arena):
    """A heap that holds nothing, released: what stays resident is the fixed regions and the
    tables kept for every committed page (page map, span records), not the allocation map; a
    reuse reserves the map again, and blocks, checks and identities hold."""
    from shm import layout as L

    arena = make_arena(heap_max=64 << 20, nslots=4)
    lay, page = arena.lay, L.OS_PAGE
    p = ProcessCache(arena)
    blocks = [p.alloc(1 << 20) for _ in range(56)] + [p.alloc(16) for _ in range(20_000)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
    verify_and_free(p, blocks)
    snap = settle(arena, p)
    arena.free_empty_spans()
    committed = arena.heap.hget("committed_pages")
    assert committed * L.PAGE_SIZE >= 56 << 20 and arena.read_stats_slow()["heap_objects"] == 0
    before, fine = resident(arena), arena.heap.hget("fine_map_pages")
    assert fine >= 20_000 * 16 // (8 * page)  # the 16 B blocks' fine-map pages, of both maps
    released = arena.scavenge()
    after = resident(arena)
    assert released == committed * L.PAGE_SIZE
    # The heap pages went, with their maps' coarse parts (a byte each per 128 heap bytes) and
    # every OS page of their fine parts ...
    assert arena.heap.hget("fine_map_pages") == 0
    gone = released + released // 64 + 2 * fine * page
    assert before - after >= gone - 2 * page, (before, after, gone)
    # ... and what stays is the fixed regions and the kept tables' entries, to the OS page.
    kept = lay.fixed_ranges() + [lay.slot_range(p.slot), lay.record_pages(arena.heap.hget("records_high"))]
    kept += [r for r in lay.page_meta(0, committed) if r not in lay.page_meta(0, committed, True)]
    assert after <= sum(n + 2 * page for _, n in kept), (after, kept)
    snap = assert_healthy(arena, p)
    assert snap["heap_released"] == released

    # Reuse: released pages and their map are committed again before they are touched.
    again = [p.alloc(size) for size in (16, 3000, 100_000, 1 << 20) for _ in range(20)]
    for b in again:
        b.buf[:] = pattern(b.handle, b.size)
    snap = assert_healthy(arena, p)
    assert snap["heap_released"] < released and snap["heap_objects"] == len(again)
    inuse = snap["heap_inuse"]
    fine = 2 * page * arena.heap.hget("fine_map_pages")
    assert fine > 0 and resident(arena) - after >= inuse + inuse // 64 + fine - 8 * page  # pages, maps
    assert unreserved(arena) == []
    assert len({b.handle for b in again}) == len(again)
    verify_and_free(p, again)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0
    p.close()


def test_a_free_next_to_released_pages_works_on_a_full_dev_shm(arena, monkeypatch):
    """A span freed next to released pages stays apart from them: the free commits nothing, so it
    never fails on a full /dev/shm, and its pages are reused as they are.  An allocation that fits
    only across both commits the released part first: on a full /dev/shm that is OutOfMemory with
    the heap unchanged, and once there is room the pages are committed again before reuse."""
    p = ProcessCache(arena)
    a, b = p.alloc(100_000), p.alloc(100_000)
    p.free(b)
    p.flush()
    released = arena.scavenge()  # b's span and the rest of the heap's growth
    assert released > 0

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    p.free(a)
    p.flush()  # a's span goes back to the heap, next to the released pages
    snap = assert_healthy(arena, p)
    assert snap["heap_released"] == released and snap["heap_objects"] == 0
    with pytest.raises(OutOfMemory, match="/dev/shm is full"):
        p.alloc(2 * a.capacity)  # fits only across a's pages and the released ones
    assert assert_healthy(arena, p) == snap
    reused = p.alloc(100_000)  # a's pages, committed already: no fallocate needed
    reused.buf[:] = pattern(reused.handle, reused.size)
    assert assert_healthy(arena, p)["heap_released"] == released
    monkeypatch.undo()
    again = [p.alloc(100_000) for _ in range(3)] + [p.alloc(2 * a.capacity)]
    assert unreserved(arena) == []
    for x in again:
        x.buf[:] = pattern(x.handle, x.size)
    snap = assert_healthy(arena, p)
    assert snap["heap_released"] <= released - 5 * a.capacity
    for x in [reused] + again:
        assert bytes(x.buf) == pattern(x.handle, x.size)
        p.free(x)
    assert_healthy(arena, p)
    p.close()


# --- the maps' fine and coarse parts ----------------------------------------------------------
def fill(p, nbytes, sizes):
    """Blocks from `sizes()` until `nbytes`, each filled with its pattern."""
    blocks, total = [], 0
    while total < nbytes:
        b = p.alloc(sizes())
        b.buf[:] = pattern(b.handle, b.size)
        blocks.append(b)
        total += b.size
    return blocks


def test_blocks_of_coarse_classes_reserve_nothing_of_the_fine_map(make_arena):
    """Blocks of coarse classes (sizes a multiple of 128) and large ones only: not one OS page of
    either map's fine part is reserved or written, and what tmpfs holds is exactly what the
    allocator's books say -- the checks and the slow walk read nothing else either."""
    import random

    from shm import layout as L

    arena = make_arena(heap_max=64 << 20, nslots=4)
    lay = arena.lay
    p = ProcessCache(arena)
    rnd = random.Random(3)
    blocks = fill(p, 24 << 20, lambda: rnd.choice([128, 256, 640, 1024, 3072, 8192, 32768, 40_000, 300_000]))
    snap = assert_healthy(arena, p)  # check_all and the slow walk, before st_blocks is read
    assert arena.heap.hget("fine_map_pages") == 0 and snap["gc_sys"] == 2 * snap["heap_sys"] // 128
    assert os.fstat(arena.fd).st_blocks * 512 == len(reserved_by_the_books(arena)) * L.OS_PAGE
    for base in (lay.amap_off, lay.gmap_off):
        try:
            data = os.lseek(arena.fd, base, os.SEEK_DATA)
        except OSError:  # ENXIO: no data past it at all
            data = lay.total_bytes
        assert data >= base + lay.fine_bytes, "a byte of a map's fine part was written"
    assert arena.metadata()["fine"] == 0
    verify_and_free(p, blocks)
    assert assert_healthy(arena, p)["heap_objects"] == 0
    p.close()


def test_per_page_metadata_costs_at_most_3_percent_of_heap_inuse(make_arena):
    """A seeded fill of random sizes 1 B..32 KiB (bench/bench_memory.py's workload, 40 MiB):
    the two maps (fine and coarse parts), the page map and the span records hold at most 3% of
    heap_inuse in tmpfs -- and so does all the metadata, the fixed regions and the claimed P
    slots included -- counted from the allocator's books, which st_blocks agrees with to the OS
    page."""
    import random

    from shm import layout as L

    arena = make_arena(heap_max=64 << 20, nslots=4)
    p = ProcessCache(arena)
    rnd = random.Random(1)
    blocks = fill(p, 40 << 20, lambda: rnd.randint(1, 32 << 10))
    snap = assert_healthy(arena, p)
    assert os.fstat(arena.fd).st_blocks * 512 == len(reserved_by_the_books(arena)) * L.OS_PAGE
    meta = arena.metadata()
    assert meta["fine"] > 0 and meta["fine"] + meta["coarse"] == snap["gc_sys"]
    per_page = meta["fine"] + meta["coarse"] + meta["pagemap"] + meta["spans"]
    assert per_page <= 0.03 * snap["heap_inuse"], (meta, snap["heap_inuse"])
    assert sum(meta.values()) <= 0.03 * snap["heap_inuse"], (meta, snap["heap_inuse"])
    verify_and_free(p, blocks)
    assert assert_healthy(arena, p)["heap_objects"] == 0
    p.close()


def test_a_full_dev_shm_at_a_fine_span_placement(arena, monkeypatch):
    """The heap has room, but /dev/shm none for the fine-map pages a span of a fine class needs:
    OutOfMemory and the arena unchanged; a coarse class still allocates; once there is room the
    pages are reserved and the class works."""
    lay = arena.lay
    p = ProcessCache(arena)
    keep = p.alloc(100_000)  # the heap's first growth: the next spans need no commit
    keep.buf[:] = pattern(keep.handle, keep.size)
    before, real, calls = metadata_bytes(arena), os.posix_fallocate, []

    def no_room_for_fine(fd, off, n):
        calls.append(off)
        if any(base <= off < base + lay.fine_bytes for base in (lay.amap_off, lay.gmap_off)):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, off, n)

    monkeypatch.setattr(os, "posix_fallocate", no_room_for_fine)
    with pytest.raises(OutOfMemory, match="/dev/shm is full: cannot commit .* allocation and generation map"):
        p.alloc(64)
    assert calls, "the fine-map pages were never asked for"
    assert metadata_bytes(arena) == before and arena.heap.hget("fine_map_pages") == 0
    coarse = p.alloc(1024)
    coarse.buf[:] = pattern(coarse.handle, coarse.size)
    monkeypatch.undo()
    fine = [p.alloc(64) for _ in range(300)]
    for b in fine:
        b.buf[:] = pattern(b.handle, b.size)
    assert unreserved(arena) == [] and arena.heap.hget("fine_map_pages") > 0
    for b in [keep, coarse, *fine]:
        assert bytes(b.buf[: b.size]) == pattern(b.handle, b.size)
        p.free(b)
    assert assert_healthy(arena, p)["heap_objects"] == 0
    p.close()
