"""The page heap (shm/heap.py) in one process: exhaustion, a full /dev/shm, release and re-commit
of idle pages."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest
from support import assert_healthy, metadata_bytes, pattern, settle

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
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=4m tmpfs /dev/shm && {sys.executable} {script}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"exit {r.returncode} (SIGBUS is -7): {r.stdout} {r.stderr}"
    assert "OOM" in r.stdout and "/dev/shm is full" in r.stdout and "CHECK OK" in r.stdout


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
