"""Cross-process locks and crash-safe operations.  See shm/__init__.py for an overview.

Locks are `fcntl` open-file-description locks (F_OFD_SETLKW) on one byte each of the segment's
file: per process (every attach opens its own description), and released by the kernel when the
holder dies -- where a `multiprocessing.Lock` or a POSIX semaphore held by a killed process blocks
everyone forever.  A `threading.Lock` per lock id makes them exclusive between the threads of one
process too.

Every mutation made under those locks is an *operation* (`Op`) run with two-phase locking: locks
are taken in ascending id order (central[c] by class, then the heap, then the registry), none is
released before the operation ends, and every word or byte it writes is first recorded in the
acting P's undo log (in its slot).  So at any instant the arena is "the last committed state plus
the undo logs of the operations in flight":

- an operation that raises (OutOfMemory, BadHandle, ...) rolls its own log back: the heap is
  exactly as before, as every bad input must;
- a process killed mid-operation leaves its locks' dirty words naming it.  The kernel drops the
  locks; the next process to take one sees the dirty word, backs out of its own operation, rolls
  the dead actor's log back under all of that actor's locks (`repair`), and retries.

The kernel drops a lock when the last reference to its open file description goes.  A child
forked with Python's fork takes a description of its own (shm/arena.py), so a parent killed inside
a critical section frees its locks at once, its children alive or not.  A fork made from C code
runs no Python hook: the child keeps the parent's description, and with it the lock, until it
exits.  Such a lock is *stranded*: the holder named in its dirty word (pid, and the start time
of that pid, so that a recycled pid is not taken for it) is dead, yet the kernel lock is held.  A
worker that meets one raises LockUnavailable instead of waiting for it forever (one already asleep
in the kernel behind a holder that dies so sleeps until the keeper exits); the daemon, which never
waits on a lock without a bound (`Locks.wait_s`), reports it and retries later.

Undo log layout (LOG_BYTES per actor, after the slot's words; `log_used` in the slot counts the
bytes of complete entries, so an entry half written when its writer died is ignored -- the write
it guards had not happened yet):

    word entry:   [1, word_index, old_value]
    bytes entry:  [2, byte_offset, stride, n, old bytes padded to 8]   (n bytes, `stride` apart)
    scatter entry: [3, n, n words of byte_offset << 8 | old byte]      (n single bytes anywhere)
    words entry:   [4, n, n pairs of word_index, old_value]             (n words anywhere)

A words entry guards every word an operation step writes at once (`Op.wset`): a dozen words for
the price of one entry.  Its words are restored last first, so a word named twice gets the value
it had before the step.
"""

import fcntl
import os
import struct
import threading
import time
from array import array
from operator import itemgetter

from . import layout as L
from .errors import CorruptionError, LockUnavailable

_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86_64/aarch64
_W_ENTRY, _B_ENTRY, _S_ENTRY, _V_ENTRY = 1, 2, 3, 4
_CLEAN = array("Q", [0] * L.LOCK_WORDS)  # a lock word nobody holds
_LOG_BYTES = L.LOG_BYTES
BOUNDED_POLL_S = 10e-6  # a bounded waiter's first poll interval, and half its longest: the
# daemon's flush in a pause waits on a P's refill under the same lock; polled every 0.2 ms at
# most, the pause's p99 with 8 workers in tight loops on 2 cores was 1.5-3.5 ms, every 20 us
# 1.2-1.4 ms (docs/PERFORMANCE.md; a trylock is one fcntl, a microsecond)


def strided(mv, off, stride, n):
    """The n bytes of `mv` from `off`, `stride` apart, touching no byte past the last one.  Up to
    a stride of a few hundred, one contiguous copy then a bytes slice is faster (up to five times)
    than a strided memoryview copy, which moves one byte at a time."""
    if stride > 256 or n <= 0:
        return bytes(mv[off : off + n * stride : stride])
    return mv[off : off + (n - 1) * stride + 1].tobytes()[::stride]


def _flock(ltype, start):
    return _FLOCK.pack(ltype, os.SEEK_SET, start, 1, 0)


def ofd_lock(fd, off):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_WRLCK, off))


def ofd_trylock(fd, off):
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK, off))
        return True
    except (BlockingIOError, PermissionError):
        return False


def ofd_unlock(fd, off):
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, off))


def ofd_wait_unlocked(fd, off):
    """Block (in the kernel, no CPU) until nobody holds a write lock on byte `off`."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, _flock(fcntl.F_RDLCK, off))
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK, off))


def ofd_held_elsewhere(fd, off):
    """True when another open file description holds a lock on byte `off`."""
    res = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK, off))
    return _FLOCK.unpack(res)[0] != fcntl.F_UNLCK


def proc_start(pid):
    """(state, start time) of process `pid`: its /proc/<pid>/stat state letter and start time in
    clock ticks after boot; None when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
    except OSError:
        return None
    rest = st[st.rindex(b")") + 2 :].split()
    return rest[0].decode(), int(rest[19])


_me = [0, 0]  # [pid, start time] of this process, recomputed after a fork


def my_start(pid):
    """This process's start time (`pid` is os.getpid()), for the lock words."""
    if _me[0] != pid:
        got = proc_start(pid)
        _me[0], _me[1] = pid, got[1] if got else 0
    return _me[1]


def holder_alive(pid, start):
    """Is the process a dirty word names (pid, start time) still running?  A zombie is not: it
    holds no lock.  A start time of 0 (unknown) trusts the pid alone."""
    got = proc_start(pid)
    if got is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return os.path.isdir(f"/proc/{pid}") or not os.path.isdir("/proc/self")
    state, begun = got
    return state != "Z" and (start == 0 or begun == start)


STRANDED_GRACE_S = 0.5  # how long a worker polls a lock whose named holder is dead before it
# judges it stranded (a live process repairing the dead operation holds it meanwhile)


class Retry(Exception):
    """Internal: the operation met a dead actor's dirty lock; it was backed out, the dead
    actor's operation rolled back, and the caller must run the operation again."""


class Stopped(Exception):
    """Internal: a P waited for its operation's first lock outside its call (Op, `gate`) and
    found, once it held it, that it was stopped meanwhile: the lock was let go with nothing
    written, and the P's call must start again -- it parks first (shm/world.py)."""


class Locks:
    """The lock table of one attached arena (one file description)."""

    def __init__(self, arena):
        self.arena = arena
        self.fd = arena.fd
        self.q = arena.q
        self.lay = arena.lay
        self.tlocks = [threading.Lock() for _ in range(L.NLOCKS)]
        # None: wait in the kernel (a worker; a stranded lock raises LockUnavailable).  Seconds:
        # poll for at most that long, then raise LockUnavailable (the daemon, whose control loop
        # must keep answering).
        self.wait_s = None
        # Called with a lock's id when a bounded wait for it begins (the daemon lends its
        # priority to the lock's holder, as to a P it waits for); None: nothing.
        self.on_wait = None

    def after_fork(self):
        """In a forked child: another thread of the parent may have held an in-process lock at
        the fork; nobody will release the child's copy."""
        self.tlocks = [threading.Lock() for _ in range(L.NLOCKS)]

    def byte(self, lid):
        return self.lay.lock_off + lid

    def raw_acquire(self, lid):
        self.tlocks[lid].acquire()
        try:
            if not ofd_trylock(self.fd, self.byte(lid)):
                self._wait(lid)
        except BaseException:
            self.tlocks[lid].release()
            raise

    def _wait(self, lid):
        """Lock `lid` is held by another description: take it, or raise LockUnavailable."""
        fd, off = self.fd, self.byte(lid)
        if self.wait_s is None:
            if not self._named_holder_dead(lid):
                ofd_lock(fd, off)  # a live holder: sleep in the kernel until it lets go
                return
            deadline = time.monotonic() + STRANDED_GRACE_S
        else:
            deadline = time.monotonic() + self.wait_s
            if self.on_wait is not None:
                self.on_wait(lid)
        # A bounded waiter (the daemon, in a pause) polls often: the holders it waits for are
        # short, and every microsecond it sleeps past a lock gone free lengthens the pause.
        pause, most = (50e-6, 5e-3) if self.wait_s is None else (BOUNDED_POLL_S, 2 * BOUNDED_POLL_S)
        while not ofd_trylock(fd, off):
            if time.monotonic() > deadline:
                raise self.unavailable(lid)
            time.sleep(pause)
            pause = min(pause * 2, most)

    def holder(self, lid):
        """(pid, start time) the dirty word of `lid` names; pid 0 when it is clean."""
        w = self.lay.lock_word(lid)
        return (self.q[w + 1], self.q[w + 2]) if self.q[w] else (0, 0)

    def _named_holder_dead(self, lid):
        pid, start = self.holder(lid)
        return pid != 0 and not holder_alive(pid, start)

    def stranded(self, lid):
        """Lock `lid` is stranded: held in the kernel by another description, while the holder
        its dirty word names is dead (see the module docstring)."""
        return self._named_holder_dead(lid) and ofd_held_elsewhere(self.fd, self.byte(lid))

    def stranded_locks(self):
        """LockUnavailable.describe() of every stranded lock (a scan of the dirty words)."""
        return [self.unavailable(lid).describe() for lid in range(L.NLOCKS) if self.stranded(lid)]

    def unavailable(self, lid):
        """The LockUnavailable error for lock `lid`, saying whether it is stranded."""
        pid, _ = self.holder(lid)
        name = L.lock_name(lid)
        if self.stranded(lid):
            return LockUnavailable(
                f"lock {name} is stranded: its holder (pid {pid}) died inside it, but a process that "
                "inherited its file description without Python's at-fork hooks (a fork made from C "
                "code) still holds it; it is released, and the dead operation rolled back, when that "
                "process exits",
                lock=name,
                holder_pid=pid,
                stranded=True,
            )
        return LockUnavailable(
            f"lock {name} not taken within {self.wait_s} s"
            + (f" (its dirty word names pid {pid})" if pid else ""),
            lock=name,
            holder_pid=pid,
        )

    def raw_release(self, lid):
        try:
            ofd_unlock(self.fd, self.byte(lid))
        finally:
            self.tlocks[lid].release()

    def dirty(self, lid):
        return self.q[self.lay.lock_word(lid)]

    def check(self):
        """A quiet arena has no half-done operation: no dirty lock word, every undo log empty.
        Returns the problems (Arena.check_all runs every structure's check)."""
        q, lay, bad = self.q, self.lay, []
        for lid in range(L.NLOCKS):
            if q[lay.lock_word(lid)]:
                bad.append(
                    f"lock {lid} is dirty (actor {q[lay.lock_word(lid)] - 1} died mid-operation, not repaired)"
                )
        for k in self.arena.registry.actors():  # a slot never claimed holds no log (nor pages)
            if q[lay.slot_word(k) + L.SLOT["log_used"]]:
                bad.append(f"actor {k} has an undo log of {q[lay.slot_word(k) + L.SLOT['log_used']]} bytes")
        return bad

    def repair(self, actor):
        """Roll back the operation the dead `actor` left half done.  Caller holds no lock."""
        lw = self.lay.lock_word
        q = self.q
        ids = [lid for lid in range(L.NLOCKS) if q[lw(lid)] == actor + 1]
        taken = []
        pid = os.getpid()
        try:
            for lid in ids:
                self.raw_acquire(lid)  # may raise LockUnavailable: nothing was changed yet
                taken.append(lid)
                if q[lw(lid)] == actor + 1:
                    # The dirty word keeps naming the dead actor (whose log is rolled back) but
                    # names its repairer as the holder now: a live holder, not a stranded lock.
                    q[lw(lid) + 1], q[lw(lid) + 2] = pid, my_start(pid)
            mine = [lid for lid in ids if q[lw(lid)] == actor + 1]
            if mine:
                UndoLog(self.arena, actor).rollback()
                for lid in mine:
                    q[lw(lid) : lw(lid) + L.LOCK_WORDS] = _CLEAN
                self.arena.repairs += 1
        finally:
            for lid in reversed(taken):
                self.raw_release(lid)
        return bool(ids)


class UndoLog:
    """The undo log of one actor (a P slot, or the daemon's slot `nslots`)."""

    def __init__(self, arena, actor):
        lay = arena.lay
        self.q = arena.q
        self.mv = arena.mv
        self.used_w = lay.slot_word(actor) + L.SLOT["log_used"]
        self.base = lay.slot_log_off(actor)

    def used(self):
        return self.q[self.used_w]

    def add_bytes(self, off, stride, old):
        n = len(old)
        q = self.q
        u = q[self.used_w]
        size = 32 + ((n + 7) & -8)
        if u + size > _LOG_BYTES:
            raise CorruptionError("undo log overflow: one operation wrote more than LOG_BYTES")
        b = self.base + u
        w = b >> 3
        q[w], q[w + 1], q[w + 2], q[w + 3] = _B_ENTRY, off, stride, n
        self.mv[b + 32 : b + 32 + n] = old
        q[self.used_w] = u + size

    def add_scatter(self, packed):
        """One entry for n single bytes: `packed` holds byte_offset << 8 | old byte for each."""
        n = len(packed)
        u = self.q[self.used_w]
        size = 16 + 8 * n
        if u + size > _LOG_BYTES:
            raise CorruptionError("undo log overflow: one operation wrote more than LOG_BYTES")
        w = (self.base + u) // 8
        q = self.q
        q[w], q[w + 1] = _S_ENTRY, n
        q[w + 2 : w + 2 + n] = array("Q", packed)
        q[self.used_w] = u + size

    def entries(self):
        q, mv = self.q, self.mv
        u, pos, out = q[self.used_w], 0, []
        while pos < u:
            w = (self.base + pos) // 8
            kind = q[w]
            if kind == _W_ENTRY:
                out.append((kind, q[w + 1], q[w + 2]))
                pos += 24
            elif kind == _B_ENTRY:
                off, stride, n = q[w + 1], q[w + 2], q[w + 3]
                b = self.base + pos + 32
                out.append((kind, (off, stride), bytes(mv[b : b + n])))
                pos += 32 + (n + 7) // 8 * 8
            elif kind == _S_ENTRY:
                n = q[w + 1]
                out.append((kind, None, q[w + 2 : w + 2 + n].tolist()))
                pos += 16 + 8 * n
            elif kind == _V_ENTRY:
                n = q[w + 1]
                out.append((kind, None, q[w + 2 : w + 2 + 2 * n].tolist()))
                pos += 16 + 16 * n
            else:
                raise CorruptionError(f"undo log entry of unknown kind {kind} at byte {pos}")
        return out

    def rollback(self):
        q, mv = self.q, self.mv
        for kind, a, b in reversed(self.entries()):
            if kind == _W_ENTRY:
                q[a] = b
            elif kind == _S_ENTRY:
                for x in b:
                    mv[x >> 8] = x & 0xFF
            elif kind == _V_ENTRY:
                for j in range(len(b) - 2, -1, -2):
                    q[b[j]] = b[j + 1]
            else:
                off, stride = a
                mv[off : off + len(b) * stride : stride] = b
        q[self.used_w] = 0

    def clear(self):
        self.q[self.used_w] = 0


class Op:
    """One crash-safe operation: two-phase locking plus an undo log.  Use through
    `Arena.run(actor, fn)`, which commits, rolls back on error, and retries after repairs."""

    __slots__ = ("locks", "q", "mv", "actor", "log", "held", "pid", "start", "gate")

    def __init__(self, arena, actor, gate=None):
        self.gate = gate  # (inside, stop) byte views of the P whose call this is: see acquire()
        self.locks = arena.locks
        self.q = arena.q
        self.mv = arena.mv
        self.actor = actor
        self.log = UndoLog(arena, actor)
        self.held = []
        self.pid = os.getpid()
        self.start = my_start(self.pid)

    def acquire(self, lid):
        if lid in self.held:
            return
        if self.held and lid < self.held[-1]:
            raise CorruptionError(f"lock order violated: lock {lid} taken after lock {self.held[-1]}")
        locks = self.locks
        if self.gate is None or self.held:
            locks.raw_acquire(lid)
        else:
            # The first lock of an operation that is the first of its P's call (nothing written
            # yet, in the arena or in the P's own lists): the P waits for it outside the call,
            # its `inside` byte clear, so that a stop-the-world takes it as stopped meanwhile
            # instead of waiting for the lock's holders and then for its own operation -- with
            # many Ps refilling one class, a queue of them.  Once it holds the lock it is inside
            # again and reads its stop byte (Dekker, as at the start of every call: the daemon's
            # membarrier orders the two sides); stopped meanwhile -- and perhaps flushed -- it
            # lets the lock go and the call starts again.
            inside, stop = self.gate
            inside[0] = 0
            try:
                locks.raw_acquire(lid)
            finally:
                inside[0] = 1
            if stop[0] != L.STOP_RUN:
                locks.raw_release(lid)
                raise Stopped()
        w = locks.lay.lock_word(lid)
        d = self.q[w]
        if d:
            # Its holder died mid-operation (a live holder always clears before unlocking).
            locks.raw_release(lid)
            self.abort()
            locks.repair(d - 1)
            raise Retry()
        self.q[w + 1] = self.pid
        self.q[w + 2] = self.start
        self.q[w] = self.actor + 1  # last: a dirty word names a whole holder
        self.held.append(lid)

    def need(self, lid, what):
        """Precondition check: the caller must hold lock `lid` to touch `what`."""
        if lid not in self.held:
            raise CorruptionError(f"{what} touched without its lock {lid}")

    # Logged writes.
    def w(self, idx, value):
        q = self.q
        old = q[idx]
        if old != value:
            log = self.log  # UndoLog.add_word, inlined: the hottest write of every slow path
            u = q[log.used_w]
            if u + 24 > _LOG_BYTES:
                raise CorruptionError("undo log overflow: one operation wrote more than LOG_BYTES")
            e = (log.base + u) >> 3
            q[e], q[e + 1], q[e + 2] = _W_ENTRY, idx, old
            q[log.used_w] = u + 24
            q[idx] = value

    def add(self, idx, delta):
        self.w(idx, self.q[idx] + delta)

    def wset(self, idxs, values):
        """Logged write of `values` at word indices `idxs`, all guarded by one log entry (a words
        entry): the entry is complete, and counted in log_used, before the first word is written,
        so a process killed anywhere in between leaves the old words or a full entry to restore
        them.  The caller computes every value before any is written: none may depend on another
        word of the same call."""
        q = self.q
        n = len(idxs)
        log = self.log
        u = q[log.used_w]
        size = 16 + 16 * n
        if u + size > _LOG_BYTES:
            raise CorruptionError("undo log overflow: one operation wrote more than LOG_BYTES")
        entry = [_V_ENTRY, n, *idxs, *idxs]
        entry[3::2] = itemgetter(*idxs)(q) if n > 1 else map(q.__getitem__, idxs)  # old values
        entry[2::2] = idxs
        e = (log.base + u) >> 3
        q[e : e + 2 + 2 * n] = array("Q", entry)
        q[log.used_w] = u + size
        for i, v in zip(idxs, values):
            q[i] = v

    def wwords(self, idx, values):
        """Logged write of consecutive words (one log entry)."""
        self.wbytes(idx * 8, 1, struct.pack(f"<{len(values)}Q", *values))

    def wbytes(self, off, stride, new, old=None):
        """Logged write of the bytes `new`, `stride` apart from `off`.  `old`: the bytes there now,
        when the caller has just read them under the lock (saves reading them again)."""
        n = len(new)
        if old is None:
            old = strided(self.mv, off, stride, n)
        if old != new:
            self.log.add_bytes(off, stride, old)
            self.mv[off : off + n * stride : stride] = new

    def wstarts(self, off, stride, old, new):
        """wbytes of a small span's object-start bytes in the allocation map, `old` just read.
        The bytes between two starts are 0 for the span's whole life and nobody writes them (a
        free checks its byte is a start's state first), so the run is stored whole, its gaps 0:
        one contiguous store, up to four times faster than a strided one while the gaps are short.
        The log keeps the starts only, as wbytes does."""
        if old != new:
            self.log.add_bytes(off, stride, old)
            if stride > 64:
                self.mv[off : off + len(new) * stride : stride] = new
                return
            run = bytearray((len(new) - 1) * stride + 1)
            run[::stride] = new
            self.mv[off : off + len(run)] = run

    def wrun(self, off, stride, old, new):
        """wbytes of bytes `stride` apart that nobody else writes now, nor any byte between them
        (`old`: the bytes there now, just read): the run from the first to the last is read,
        patched and stored whole -- one contiguous store, where a strided one moves a byte at a
        time, up to four times slower.  The log keeps the bytes written only, as wbytes does."""
        if old != new:
            self.log.add_bytes(off, stride, old)
            mv = self.mv
            if stride > 64:
                mv[off : off + len(new) * stride : stride] = new
                return
            end = off + (len(new) - 1) * stride + 1
            run = bytearray(mv[off:end])
            run[::stride] = new
            mv[off:end] = run

    def wscatter(self, offs, values):
        """Logged write of single bytes at byte offsets `offs` (one log entry for all)."""
        mv = self.mv
        self.log.add_scatter([o << 8 | mv[o] for o in offs])
        for o, v in zip(offs, values):
            mv[o] = v

    def wbyte(self, off, value):
        if self.mv[off] != value:
            self.log.add_bytes(off, 1, bytes((self.mv[off],)))
            self.mv[off] = value

    def _release_all(self):
        q = self.q
        lw = self.locks.lay.lock_word
        for lid in reversed(self.held):
            q[lw(lid)] = 0  # first: a clean word names nobody
            q[lw(lid) + 1] = 0
            q[lw(lid) + 2] = 0
            self.locks.raw_release(lid)
        self.held = []

    def commit(self):
        self.log.clear()
        self._release_all()

    def abort(self):
        self.log.rollback()
        self._release_all()
