"""Operations and their undo logs (shm/locks.py): a failed operation rolled back, and the largest
operations still fitting their bounded log; who holds a lock (the dirty word's pid and start
time), a stranded lock, the daemon's bounded waits, and a forked child's own descriptions."""

import os
import signal
import time
from array import array

import pytest
from support import assert_healthy, metadata_bytes

from shm import Arena, BadHandle, LockUnavailable, ProcessCache, layout
from shm.central import EMPTY_KEEP_C
from shm.locks import UndoLog, holder_alive, my_start, ofd_trylock


def test_undo_log_rolls_back_a_failed_operation(arena):
    """An exception half way through an operation leaves the arena as it was."""
    p = ProcessCache(arena)
    keep = [p.alloc(5000) for _ in range(3)]
    before = metadata_bytes(arena)

    def half(op):
        arena.large.alloc(op, 13, -1)  # a 100 000-byte object: 13 pages
        arena.heap.free_span  # noqa: B018 - reached: the allocation above is complete
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        arena.run(p.slot, half)
    assert metadata_bytes(arena) == before
    for b in keep:
        p.free(b)
    assert_healthy(arena, p)
    p.close()


@pytest.mark.slow
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
    arena.flush_all(stopped=[p.slot], keep_empty=True)
    # The spans its buffered frees emptied: EMPTY_KEEP_C (4 for 8-byte blocks) wait for a refill,
    # the others went back to the heap at once; and the one it cached, kept by the flush.
    assert arena.free_empty_spans() == EMPTY_KEEP_C[1] + 1 == 5
    assert bytes(p.view(big.handle)[-8:]) == b"lastpage"
    p.free(big)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0
    p.close()


def _stop_inside(arena, actor, lid, pid, start):
    """A dirty word as a holder that died inside lock `lid` leaves it (the kernel lock aside)."""
    w = arena.lay.lock_word(lid)
    arena.q[w + 1], arena.q[w + 2], arena.q[w] = pid, start, actor + 1


def _dead_pid():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_the_dirty_word_names_its_holder_by_pid_and_start_time(arena):
    """A holder is alive only while a process of its pid AND its start time runs: a recycled pid
    (same pid, another start) and a pid that is gone are dead holders."""
    me = os.getpid()
    start = my_start(me)
    assert start > 0 and holder_alive(me, start)
    assert not holder_alive(me, start + 1)  # the pid, recycled by another process
    assert not holder_alive(_dead_pid(), 0)
    seen = {}

    def look(op):
        op.acquire(layout.LOCK_HEAP)
        w = arena.lay.lock_word(layout.LOCK_HEAP)
        seen["word"] = list(arena.q[w : w + layout.LOCK_WORDS])

    p = ProcessCache(arena)
    arena.run(p.slot, look)
    assert seen["word"] == [p.slot + 1, me, start]
    w = arena.lay.lock_word(layout.LOCK_HEAP)
    assert list(arena.q[w : w + layout.LOCK_WORDS]) == [0, 0, 0]
    p.close()


def test_a_lock_held_for_a_dead_holder_is_stranded_and_never_waited_for(make_arena):
    """Another description holds the heap lock while its dirty word names a dead process: what a
    child forked from C code leaves.  A worker's operation that needs it raises LockUnavailable
    (stranded) instead of hanging, and changes nothing; the lock is listed as stranded.  Once the
    keeper lets go, the next taker rolls the dead operation back."""
    arena = make_arena()
    keeper = Arena.attach(arena.name)  # another open file description of the same segment
    try:
        p = ProcessCache(arena)
        dead = _dead_pid()
        keeper.locks.raw_acquire(layout.LOCK_HEAP)
        _stop_inside(arena, arena.daemon_actor, layout.LOCK_HEAP, dead, 0)
        before = metadata_bytes(arena)
        with pytest.raises(LockUnavailable, match="lock heap is stranded") as e:
            p.alloc(100_000)
        assert (e.value.lock, e.value.holder_pid, e.value.stranded) == ("heap", dead, True)
        assert metadata_bytes(arena) == before
        assert arena.locks.stranded_locks() == [{"lock": "heap", "holder_pid": dead, "stranded": True}]
        keeper.locks.raw_release(layout.LOCK_HEAP)
        assert arena.locks.stranded_locks() == []
        repairs = arena.repairs
        b = p.alloc(100_000)
        assert arena.repairs == repairs + 1
        p.free(b)
        assert_healthy(arena, p)
        p.close()
    finally:
        keeper.close()


def test_a_bounded_wait_gives_up_and_changes_nothing(make_arena):
    """The daemon's waits are bounded (Locks.wait_s): a lock a live process holds past the bound
    raises LockUnavailable, not stranded, and the operation is rolled back."""
    arena = make_arena()
    other = Arena.attach(arena.name)
    try:
        p = ProcessCache(arena)
        keep = p.alloc(64)
        other.locks.raw_acquire(layout.LOCK_HEAP)
        _stop_inside(other, other.daemon_actor, layout.LOCK_HEAP, os.getpid(), my_start(os.getpid()))
        arena.locks.wait_s = 0.05
        before = metadata_bytes(arena)
        with pytest.raises(LockUnavailable, match="not taken within") as e:
            arena.flush_cache(p.slot, p.slot)
        assert not e.value.stranded and e.value.holder_pid == os.getpid()
        assert metadata_bytes(arena) == before
        w = arena.lay.lock_word(layout.LOCK_HEAP)
        arena.q[w : w + layout.LOCK_WORDS] = array("Q", [0] * layout.LOCK_WORDS)
        other.locks.raw_release(layout.LOCK_HEAP)
        p.free(keep)
        assert_healthy(arena, p)
        p.close()
    finally:
        other.close()


def test_a_forked_child_holds_none_of_its_parents_locks(arena):
    """After os.fork() the child's descriptors and mapping refer to a description of its own: a
    lock the parent holds is a lock held elsewhere for the child, the same addresses still show
    the same shared memory (a view taken before the fork included), and every descriptor of the
    segment in the child is a new description."""
    view = arena.view(arena.lay.heap_off, arena.lay.heap_off + 16)
    view[:4] = b"prnt"
    byte = arena.lay.lock_off + layout.LOCK_HEAP
    arena.locks.raw_acquire(layout.LOCK_HEAP)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never raise
        try:
            ok = [
                not ofd_trylock(arena.fd, byte),  # held by the parent's description, not ours
                bytes(view[:4]) == b"prnt",
            ]
            view[4:8] = b"chld"  # seen by the parent: the same shared pages
            segment = os.fstat(arena.fd)
            mine = []
            for n in os.listdir("/proc/self/fd"):
                try:
                    s = os.fstat(int(n))
                except OSError:
                    continue
                if (s.st_dev, s.st_ino) == (segment.st_dev, segment.st_ino):
                    mine.append(int(n))
            ok.append(len(mine) >= 2)  # the Arena's descriptor and the mmap object's dup
            os.write(w, repr((ok, mine)).encode())
        finally:
            os._exit(0)
    os.close(w)
    got = os.read(r, 4096).decode()
    os.close(r)
    os.waitpid(pid, 0)
    assert got.startswith("([True, True, True]"), got
    assert bytes(view[4:8]) == b"chld"
    arena.locks.raw_release(layout.LOCK_HEAP)


def test_a_forked_childs_descriptors_are_new_descriptions(arena):
    """kcmp(2) across the two processes: no descriptor of the child refers to the parent's
    description of the segment."""
    from shm.arena import _NR_KCMP, _c

    if _NR_KCMP is None:
        pytest.skip("no kcmp(2) on this machine")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            fds = [int(n) for n in os.listdir("/proc/self/fd")]
            os.write(w, repr(fds).encode())
            time.sleep(30)
        finally:
            os._exit(0)
    try:
        os.close(w)
        fds = eval(os.read(r, 4096).decode())  # noqa: S307 - our own child's repr of a list of ints
        os.close(r)
        me = os.getpid()
        shared = [n for n in fds if _c().syscall(_NR_KCMP, me, pid, 0, arena.fd, n) == 0]
        assert shared == [], f"child descriptors {shared} still refer to the parent's description"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_words_entry_rolls_back_every_word_it_guards(arena):
    """Op.wset logs several words in one entry, a word named twice included; an operation that
    raises after it leaves every word as it was."""
    p = ProcessCache(arena)
    hw = arena.lay.heap_word()
    a, b = hw + layout.HEAP["bad_frees"], hw + layout.HEAP["large_mallocs"]
    before = metadata_bytes(arena)
    old = arena.q[a], arena.q[b]
    seen = {}

    def batch(op):
        op.acquire(layout.LOCK_HEAP)
        op.wset([a, b, a], [old[0] + 7, old[1] + 8, old[0] + 9])
        seen["words"] = arena.q[a], arena.q[b]
        seen["log"] = op.log.entries()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        arena.run(p.slot, batch)
    assert seen["words"] == (old[0] + 9, old[1] + 8)  # the last write of a word wins
    assert seen["log"] == [(4, None, [a, old[0], b, old[1], a, old[0]])]
    assert (arena.q[a], arena.q[b]) == old
    assert metadata_bytes(arena) == before
    assert_healthy(arena, p)
    p.close()


def test_a_half_written_words_entry_is_ignored(arena):
    """A writer killed while it filled a words entry never advanced log_used, so it had stored
    none of the words the entry guards: the repair must not 'restore' the entry's values."""
    p = ProcessCache(arena)
    hw = arena.lay.heap_word()
    a = hw + layout.HEAP["bad_frees"]
    old = arena.q[a]
    actor = arena.daemon_actor
    log = arena.lay.slot_log_off(actor) // 8
    arena.q[log : log + 4] = array("Q", [4, 1, a, old + 1234])  # the entry, its count not advanced
    _stop_inside(arena, actor, layout.LOCK_HEAP, _dead_pid(), 0)
    repairs = arena.repairs
    b = p.alloc(100_000)  # takes the heap lock: repairs the dead operation first
    assert arena.repairs == repairs + 1
    assert arena.q[a] == old
    p.free(b)
    assert_healthy(arena, p)
    p.close()


@pytest.mark.parametrize("written", [0, 3])
def test_sigkill_inside_a_batched_write_is_rolled_back(make_arena, written):
    """The victim dies inside Op.wset during a flush: its words entry is complete and `written`
    of the words it guards are stored, the rest not.  The next process to take the lock rolls
    every one back (Locks.repair), and the dead P's reclaim flushes its cache once."""
    import multiprocessing as mp

    import mpworkers
    from support import DEADLINE

    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    victim = ctx.Process(target=mpworkers.stuck_in_batched_write, args=(arena.name, written, ready, out))
    victim.start()
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    idxs, values = out.get(timeout=DEADLINE)
    slot = next(k for k in arena.registry.active_slots() if arena.registry.pid(k) == victim.pid)
    entry = [e for e in UndoLog(arena, slot).entries() if e[0] == 4][-1][2]
    assert entry[0::2] == idxs
    # Half done: the first `written` words hold their new values, the others their old ones.
    assert [arena.q[i] for i in idxs[:written]] == values[:written]
    assert [arena.q[i] for i in idxs[written:]] == entry[1::2][written:]
    assert any(o != v for o, v in zip(entry[1::2][written:], values[written:]))
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    repairs = arena.repairs
    assert arena.locks.repair(slot)  # what the next taker of the victim's locks runs
    assert arena.repairs == repairs + 1
    assert [arena.q[i] for i in idxs] == entry[1::2]  # every word as before the write
    b = main.alloc(64)  # central[64 B], which the victim died holding, works on
    assert arena.repairs == repairs + 1
    main.free(b)
    snap = assert_healthy(arena, main)  # reclaims the victim: its cache flushed again, once
    assert snap["heap_objects"] == 5  # the five blocks it kept
    main.close()
