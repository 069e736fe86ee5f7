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
  exactly as before, as the brief demands of every bad input;
- a process killed mid-operation leaves its locks' dirty words naming it.  The kernel drops the
  locks; the next process to take one sees the dirty word, backs out of its own operation, rolls
  the dead actor's log back under all of that actor's locks (`repair`), and retries.

Undo log layout (LOG_BYTES per actor, after the slot's words; `log_used` in the slot counts the
bytes of complete entries, so an entry half written when its writer died is ignored -- the write
it guards had not happened yet):

    word entry:   [1, word_index, old_value]
    bytes entry:  [2, byte_offset, stride, n, old bytes padded to 8]   (n bytes, `stride` apart)
    scatter entry: [3, n, n words of byte_offset << 8 | old byte]      (n single bytes anywhere)
"""

import fcntl
import os
import struct
import threading
from array import array

from . import layout as L
from .errors import CorruptionError

_FLOCK = struct.Struct("hhxxxxqqixxxx")  # struct flock on Linux x86_64/aarch64
_W_ENTRY, _B_ENTRY, _S_ENTRY = 1, 2, 3


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


class Retry(Exception):
    """Internal: the operation met a dead actor's dirty lock; it was backed out, the dead
    actor's operation rolled back, and the caller must run the operation again."""


class Locks:
    """The lock table of one attached arena (one file description)."""

    def __init__(self, arena):
        self.arena = arena
        self.fd = arena.fd
        self.q = arena.q
        self.lay = arena.lay
        self.tlocks = [threading.Lock() for _ in range(L.NLOCKS)]

    def byte(self, lid):
        return self.lay.lock_off + lid

    def raw_acquire(self, lid):
        self.tlocks[lid].acquire()
        try:
            ofd_lock(self.fd, self.byte(lid))
        except BaseException:
            self.tlocks[lid].release()
            raise

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
        for k in range(lay.nslots + 2):
            if q[lay.slot_word(k) + L.SLOT["log_used"]]:
                bad.append(f"actor {k} has an undo log of {q[lay.slot_word(k) + L.SLOT['log_used']]} bytes")
        return bad

    def repair(self, actor):
        """Roll back the operation the dead `actor` left half done.  Caller holds no lock."""
        lw = self.lay.lock_word
        q = self.q
        ids = [lid for lid in range(L.NLOCKS) if q[lw(lid)] == actor + 1]
        for lid in ids:
            self.raw_acquire(lid)
        try:
            mine = [lid for lid in ids if q[lw(lid)] == actor + 1]
            if mine:
                UndoLog(self.arena, actor).rollback()
                for lid in mine:
                    q[lw(lid)] = 0
                    q[lw(lid) + 1] = 0
                self.arena.repairs += 1
        finally:
            for lid in reversed(ids):
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
        u = self.q[self.used_w]
        size = 32 + (n + 7) // 8 * 8
        if u + size > L.LOG_BYTES:
            raise CorruptionError("undo log overflow: one operation wrote more than LOG_BYTES")
        w = (self.base + u) // 8
        q = self.q
        q[w], q[w + 1], q[w + 2], q[w + 3] = _B_ENTRY, off, stride, n
        b = self.base + u + 32
        self.mv[b : b + n] = old
        q[self.used_w] = u + size

    def add_scatter(self, packed):
        """One entry for n single bytes: `packed` holds byte_offset << 8 | old byte for each."""
        n = len(packed)
        u = self.q[self.used_w]
        size = 16 + 8 * n
        if u + size > L.LOG_BYTES:
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
            else:
                off, stride = a
                mv[off : off + len(b) * stride : stride] = b
        q[self.used_w] = 0

    def clear(self):
        self.q[self.used_w] = 0


class Op:
    """One crash-safe operation: two-phase locking plus an undo log.  Use through
    `Arena.run(actor, fn)`, which commits, rolls back on error, and retries after repairs."""

    __slots__ = ("locks", "q", "mv", "actor", "log", "held", "pid")

    def __init__(self, arena, actor):
        self.locks = arena.locks
        self.q = arena.q
        self.mv = arena.mv
        self.actor = actor
        self.log = UndoLog(arena, actor)
        self.held = []
        self.pid = os.getpid()

    def acquire(self, lid):
        if lid in self.held:
            return
        if self.held and lid < self.held[-1]:
            raise CorruptionError(f"lock order violated: lock {lid} taken after lock {self.held[-1]}")
        locks = self.locks
        locks.raw_acquire(lid)
        w = locks.lay.lock_word(lid)
        d = self.q[w]
        if d:
            # Its holder died mid-operation (a live holder always clears before unlocking).
            locks.raw_release(lid)
            self.abort()
            locks.repair(d - 1)
            raise Retry()
        self.q[w] = self.actor + 1
        self.q[w + 1] = self.pid
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
            if u + 24 > L.LOG_BYTES:
                raise CorruptionError("undo log overflow: one operation wrote more than LOG_BYTES")
            e = (log.base + u) >> 3
            q[e], q[e + 1], q[e + 2] = _W_ENTRY, idx, old
            q[log.used_w] = u + 24
            q[idx] = value

    def add(self, idx, delta):
        self.w(idx, self.q[idx] + delta)

    def wwords(self, idx, values):
        """Logged write of consecutive words (one log entry)."""
        self.wbytes(idx * 8, 1, struct.pack(f"<{len(values)}Q", *values))

    def wbytes(self, off, stride, new):
        n = len(new)
        view = self.mv[off : off + n * stride : stride]
        old = bytes(view)
        if old != new:
            self.log.add_bytes(off, stride, old)
            view[:] = new

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
            q[lw(lid)] = 0
            q[lw(lid) + 1] = 0
            self.locks.raw_release(lid)
        self.held = []

    def commit(self):
        self.log.clear()
        self._release_all()

    def abort(self):
        self.log.rollback()
        self._release_all()
