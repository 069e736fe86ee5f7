"""Helpers the tests import (`from support import ...`): names, the one block pattern, the real
daemon as the README starts it, a byte image of an arena's metadata.  The fixtures that use them
are in conftest.py.  tests/ is on sys.path through pyproject's [tool.pytest.ini_options]
pythonpath, so `spawn` children import this module and mpworkers.py by name too."""

import errno
import os
import shutil
import signal
import sys
import time
import uuid

import client
from service.demo import pattern  # the one pattern, shared with the demo
from shm import identities, read_stats_slow, stats
from shm import layout as L

__all__ = [
    "ROOT",
    "PREFIX",
    "shm_names",
    "child_pids",
    "unique_name",
    "pattern",
    "DEADLINE",
    "EXE",
    "Daemon",
    "wait_ping",
    "metadata_bytes",
    "unreserved",
    "settle",
    "spawn_victim",
    "assert_healthy",
    "resident",
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Every segment a test makes carries this session's prefix, so that two suites running at once
# never blame (or delete) each other's segments.
SESSION = uuid.uuid4().hex[:6]
PREFIX = f"shmalloc-test-{SESSION}-"


def shm_names():
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


def _helpers():
    """multiprocessing's own long-lived helper processes (resource tracker, forkserver)."""
    pids = set()
    from multiprocessing import forkserver, resource_tracker

    for obj in (resource_tracker._resource_tracker, forkserver._forkserver):
        pid = getattr(obj, "_pid", None) or getattr(obj, "_forkserver_pid", None)
        if pid:
            pids.add(pid)
    return pids


def child_pids():
    """Live (non-zombie) direct children of this process, from /proc, less multiprocessing's
    own helpers."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2 :].split()
        if int(rest[1]) == me and rest[0] != "Z":
            out.add(int(d))
    return out - _helpers()


def unique_name(tag="t"):
    return f"{PREFIX}{tag}-{uuid.uuid4().hex[:8]}"


# --- the real daemon ---------------------------------------------------------------------------
DEADLINE = 120  # seconds: only turns a hang into a failure
EXE = [shutil.which("shmalloc")] if shutil.which("shmalloc") else [sys.executable, "-m", "service"]


class Daemon:
    def __init__(self, proc, endpoint, name, logpath):
        self.proc, self.endpoint, self.name, self.logpath = proc, endpoint, name, logpath

    def log(self):
        with open(self.logpath) as f:
            return f.read()

    def sock_path(self):
        return self.endpoint[len("ipc://") :]

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(DEADLINE)


def wait_ping(endpoint, proc, curve=None):
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.ping(endpoint, 200, curve=curve)
        except client.DaemonUnavailable:
            if proc.poll() is not None:
                return None
            assert time.monotonic() < deadline, "daemon did not answer within 30 s"


def metadata_bytes(arena):
    """Everything of the arena but the heap pages and the dead bytes of the undo logs (an
    empty log keeps its last entries' bytes): a heap 'unchanged' check compares these.  Read
    with pread, which reads a page never reserved (or given back) as zeros without making
    tmpfs hold it, as a read through the mapping would."""
    lay = arena.lay
    parts = [os.pread(arena.fd, lay.slots_off, 0)]
    # P control, not heap state (a call that raises may still resync first: synced_gen)
    control = [L.SLOT[n] for n in ("stop", "parked", "heartbeat_ns", "synced_gen")]
    for k in arena.registry.actors():  # the slots never claimed were never touched
        w = lay.slot_word(k)
        words = list(arena.q[w : w + L.SLOT_HEAD_WORDS])
        for i in control:
            words[i] = 0
        parts.append(repr(words).encode())
    parts.append(os.pread(arena.fd, lay.heap_off - lay.spans_off, lay.spans_off))
    return b"".join(parts)


def unreserved(arena):
    """The ranges the allocator may touch that tmpfs had not reserved: the fixed regions, every
    claimed P slot, the span table's pages under records [0, records_high), the pages of every
    span not released with every table entry over them, a released span's entries in the tables
    kept (layout.Layout.page_tables), and the maps' fine-part OS pages over every span of a fine
    class.  Found by reserving each range again
    (posix_fallocate) and watching the segment's st_blocks: a reserved range adds nothing.  Run
    on a quiet arena.  A page touched without a reservation counts as reserved: this finds the
    reservations missing where nothing was written yet."""
    lay, fd, page = arena.lay, arena.fd, L.PAGE_SIZE
    need = arena.reserved_ranges()  # fixed regions, claimed slots, the span table's pages in use
    for rec in arena.heap.span_records():
        s, n = rec["start"], rec["npages"]
        if rec["state"] == L.SPAN_FREE and rec["released"]:
            need += [(base + s * per, n * per) for base, per, given_back in lay.page_tables if not given_back]
        else:
            need += [(lay.heap_off + s * page, n * page), *lay.page_meta(s, n)]
        if rec["state"] == L.SPAN_INUSE and rec["sizeclass"] and not L.CLASS_COARSE[rec["sizeclass"]]:
            need += lay.fine_ranges(lay.fine_pages(s, n))
    missing = []
    for off, n in need:
        before = os.fstat(fd).st_blocks
        os.posix_fallocate(fd, off, n)
        if os.fstat(fd).st_blocks != before:
            missing.append((off, n))
    return missing


def spawn_victim(target, name, *args):
    """Start target(name, ready, out, *args) in a spawned process (a fresh interpreter): a victim
    that puts what the test needs on `out` and sets `ready` where it stops for the test's SIGKILL
    (mpworkers.stop_forever).  Returns (process, ready, out)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=target, args=(name, ready, out, *args))
    proc.start()
    return proc, ready, out


def full_after(monkeypatch, n):
    """posix_fallocate works `n` more times, then /dev/shm is full (ENOSPC).  Returns the calls."""
    real, calls = os.posix_fallocate, []

    def fallocate(fd, off, size):
        calls.append((off, size))
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, off, size)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    return calls


def kill_and_repair(arena, victim, take):
    """SIGKILL `victim`, stopped inside an operation with a lock held dirty, and reap it; then
    run `take` -- a call that takes the lock it died in -- and check that exactly one repair
    rolled the dead operation back.  Returns what `take` returned."""
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    repairs = arena.repairs
    out = take()
    assert arena.repairs == repairs + 1, "the dead operation was not rolled back"
    return out


def settle(arena, *caches):
    """Flush the given caches (we are their only thread) and read the figures."""
    return arena.update_stats(stopped=[c.slot for c in caches])


def assert_healthy(arena, *caches):
    snap = settle(arena, *caches)
    assert identities(snap) == []
    assert arena.check_all() == []
    assert stats.diff(snap, read_stats_slow(arena)) == []
    return snap


def verify_and_free(cache, blocks):
    """Each block still holds its pattern (none overlapped another), then freed through `cache`."""
    for b in blocks:
        assert bytes(b.buf) == pattern(b.handle, b.size), f"block {b.handle} ({b.size} bytes) was overwritten"
        cache.free(b)


def resident(name):
    """Arena.resident() of /dev/shm/<name>, attached for the call."""
    from shm import Arena

    arena = Arena.attach(name)
    try:
        return arena.resident()
    finally:
        arena.close()


def os_pages(ranges):
    """The OS page numbers (of the segment) that `ranges` [(offset, bytes)] touch."""
    return {p for off, n in ranges for p in range(off // L.OS_PAGE, -(-(off + n) // L.OS_PAGE))}


def unreleased_spans(arena):
    """[(start page, npages)] of every span whose pages are committed: in use, or free and
    retained (not released) -- from the span records."""
    return [
        (r["start"], r["npages"])
        for r in arena.heap.span_records()
        if not (r["state"] == L.SPAN_FREE and r["released"])
    ]


def kept_table_ranges(arena):
    """[(offset, bytes)] of the entries, in the tables given back with their pages, of every heap
    page not released (unreleased_spans): all a release may leave of those tables.  Counted from
    the span records, not from what a release computes it gives back."""
    return [
        (base + start * per, npages * per)
        for start, npages in unreleased_spans(arena)
        for base, per, given_back in arena.lay.page_tables
        if given_back
    ]


def reserved_by_the_books(arena):
    """The OS pages the allocator says it holds reserved: the fixed regions, the claimed P slots
    and the span table's pages in use (Arena.reserved_ranges); the tables kept for every
    committed page (the page map); the heap pages not released, with their entries in the tables
    given back with them (kept_table_ranges); and the fine-map pages whose flag is set (both
    maps)."""
    lay = arena.lay
    committed = arena.heap.hget("committed_pages")
    flags = bytes(arena.mv[lay.finemap_flags : lay.finemap_flags + lay.fine_os_pages])
    fine = [r for p, f in enumerate(flags) if f for r in lay.fine_ranges(range(p, p + 1))]
    kept = [
        (base, committed * per) for base, per, given_back in lay.page_tables if not given_back
    ] + kept_table_ranges(arena)
    heap = [(lay.heap_off + start * L.PAGE_SIZE, n * L.PAGE_SIZE) for start, n in unreleased_spans(arena)]
    return os_pages(arena.reserved_ranges() + kept + heap + fine)
