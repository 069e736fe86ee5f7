"""Stopping the world: both halves of the handshake.  See shm/__init__.py for an overview.

A snapshot must read the figures while no P changes them, after every P's cache was flushed.
Go stops a P that is in a system call without waiting for its thread (_Psyscall -> _Pgcstop);
here a P that is not inside an allocator call is stopped the same way, from the daemon's side:
no message, no GIL, no grace.  Only a P caught inside a call is waited for, and only until that
call returns.

The words (P slot k, layout.SLOT):

    stop     STOP_RUN / STOP_PARK / STOP_RESYNC; the daemon writes PARK to stop the P, and RUN
             or RESYNC to resume it.  The P writes RUN over RESYNC, inside a call.
    inside   1 while the P is inside an allocator call; written by the P only.
    barrier  1 when the P registered for membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED).
    parked   the epoch the P parked for (the cooperative protocol below).

The P (ProcessCache, every call, fast path or slow):

    inside := 1;  s := stop;  if s == RUN: do the call;  inside := 0

and with s != RUN it clears `inside` and parks on the resume lock (PARK), or drops its local
lists and writes RUN (RESYNC, still inside) and looks again.

A call whose first operation must take a lock -- a refill, an alloc of a large block none of
whose size is cached, a free that finds its remote-free buffer full -- waits for that first lock
outside the call, nothing written yet: `inside := 0` while it waits, then `inside := 1; s := stop`
once it holds the lock, the same handshake as a call's start, and with s != RUN it lets the lock
go and the call starts again (shm/locks.py, Op.acquire).  Several Ps refilling one class queue
for its lock; a stop would otherwise wait for each of them in turn to take it and finish.

The daemon (StopTheWorld):

    stop := PARK for every live P;  membarrier();  then for each P: inside == 0 -> stopped

(or for one P alone, `begin(epoch, only=...)`: the daemon's ragged round flushes each P so
before the pause, each with an epoch of its own).

Why this is correct.  It is Dekker's handshake: each side stores its own word, then loads the
other's.  Both x86 and arm64 may let a store sit in a store buffer while a later load to another
address goes ahead, so each side needs a full barrier between its store and its load -- or one
side may see "running" while the other sees "outside", and the daemon would flush a cache the P
is popping from.  The P's fast path takes no fence (Python cannot issue one, and a system call per
alloc would cost more than the alloc).  The barrier is asymmetric instead, as liburcu and folly do
it: the daemon calls membarrier(MEMBARRIER_CMD_GLOBAL_EXPEDITED), which runs a full memory barrier
on every CPU that is running a thread of a registered process, before it returns.  So for each P,
either its `inside := 1` was issued before that barrier -- then it is visible to the daemon's load,
and the daemon waits -- or it comes after, and then the P's load of `stop` comes after the barrier
too and sees PARK.  A P that is not on a CPU at that moment went through a context switch, which
is a full barrier.

The one store the P makes to `stop` (RUN over RESYNC) may land after the daemon's PARK and erase
it.  So a P is only judged stopped once, after one more membarrier, its `stop` still reads PARK
and its `inside` reads 0 (`confirm`): the P makes that store inside a call, so a P that erased a
PARK either is still inside (the daemon waits and asks again) or its store is visible by then.

Where membarrier is not available (an old kernel, seccomp, another OS) or a P could not register,
that P is stopped the cooperative way instead: its next allocator call parks it through its stop
byte, and the daemon wakes its control thread (client/) with a STOP message when it is not inside
the allocator; the daemon then waits for `parked == epoch`.  The daemon says which protocol it
uses in its log and in every snapshot (`stop_protocol`).

Closing an arena for good (`close_for_good`: a forced stop of the daemon, `shmalloc cleanup
--force`) costs the fast path nothing: the closer marks the header (`closed`, why) and then sets
every live P's stop byte to STOP_CLOSED, under the registry lock (a P claimed after it is
refused).  Any non-zero stop byte sends a call to the slow path, and the slow path raises
ArenaClosed when it reads STOP_CLOSED or finds the mark.  The daemon does it while the world is
stopped, so that no P is between reading a RESYNC and writing RUN over it (which would erase
the STOP_CLOSED); a P found late is caught by the mark at its next slow path.

A stopped P may be flushed by the daemon (Arena.flush_slots) while the P runs other code: its
local lists are then stale, which is why the daemon resumes it with RESYNC rather than RUN.

Parked Ps sleep in the kernel on the resume lock, a byte of the segment's file that the daemon
holds (write) while the world is stopped; they wake when it lifts the lock or dies.  A parked P
goes on without the daemon when the daemon that stopped it is gone: its lock on DAEMON_LOCK_BYTE
was dropped by the kernel (a dead process, even one not yet reaped -- a zombie holds no locks),
or another daemon adopted the arena since (the header names another pid).
"""

import ctypes
import os
import platform
import time

from . import layout as L
from .errors import ArenaClosed, LockUnavailable
from .locks import ofd_held_elsewhere, ofd_lock, ofd_trylock, ofd_unlock, ofd_wait_unlocked

SL = L.SLOT

# --- membarrier(2) ----------------------------------------------------------------------------
_MEMBARRIER_CMD_QUERY = 0
_MEMBARRIER_CMD_GLOBAL_EXPEDITED = 1 << 1
_MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED = 1 << 2
_NR_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "arm64": 283}.get(platform.machine())
_DISABLE_ENV = "SHMALLOC_NO_MEMBARRIER"  # set to 1: use the cooperative protocol (tests, debugging)

_libc = None


def _syscall(*args):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc.syscall(*args)


def membarrier_supported():
    """True when this kernel offers the expedited global barrier (and it is not disabled)."""
    if _NR_MEMBARRIER is None or os.environ.get(_DISABLE_ENV) == "1":
        return False
    try:
        mask = _syscall(_NR_MEMBARRIER, _MEMBARRIER_CMD_QUERY, 0, 0)
    except (OSError, AttributeError):
        return False
    return (
        mask > 0
        and bool(mask & _MEMBARRIER_CMD_GLOBAL_EXPEDITED)
        and bool(mask & _MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED)
    )


def register_process():
    """Worker side: register this process for the daemon's expedited barriers.  Returns True on
    success; False means the daemon must stop this P the cooperative way."""
    if not membarrier_supported():
        return False
    return _syscall(_NR_MEMBARRIER, _MEMBARRIER_CMD_REGISTER_GLOBAL_EXPEDITED, 0, 0) == 0


def barrier():
    """Daemon side: a full memory barrier on every CPU running a registered process's thread."""
    if _syscall(_NR_MEMBARRIER, _MEMBARRIER_CMD_GLOBAL_EXPEDITED, 0, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"membarrier(GLOBAL_EXPEDITED): {os.strerror(e)}")


# --- the P's half -------------------------------------------------------------------------------
def park(arena, k, epoch):
    """Park P k for `epoch`: say so, then sleep until the daemon lifts the stop.  The caller has
    cleared the P's `inside` word, holds its in-process lock, and has no shared write half done.
    Returns when the stop for `epoch` is lifted, or when the daemon that asked is gone (the P then
    resyncs on its own)."""
    q, sw = arena.q, arena.lay.slot_word(k)
    issuer = q[L.HDR["daemon_pid"]]
    q[sw + SL["parked_ns"]] = time.monotonic_ns()
    q[sw + SL["parked"]] = epoch
    while q[sw + SL["stop"]] == L.STOP_PARK and q[sw + SL["stop_epoch"]] == epoch:
        ofd_wait_unlocked(arena.fd, L.resume_lock_byte(epoch))
        if q[sw + SL["stop"]] == L.STOP_PARK and q[sw + SL["stop_epoch"]] == epoch:
            # The lock is free but the stop stands: the daemon is between two steps of taking
            # it, or it is gone.
            if not daemon_alive(arena, issuer):
                q[sw + SL["stop"]] = L.STOP_RESYNC  # go on without it
                return
            time.sleep(200e-6)


def daemon_alive(arena, pid):
    """Is the daemon `pid` still serving this arena?  Not `kill(pid, 0)`: a daemon killed but not
    yet reaped still has a pid, but the kernel dropped its locks."""
    return (
        pid != 0 and arena.q[L.HDR["daemon_pid"]] == pid and ofd_held_elsewhere(arena.fd, L.DAEMON_LOCK_BYTE)
    )


# --- closing for good -------------------------------------------------------------------------
_WHY = {
    L.CLOSED_FORCED: "closed for good by its daemon (pid {pid}, a forced shutdown)",
    L.CLOSED_STOPPED: "removed by its daemon (pid {pid}), which stopped with no worker attached",
    L.CLOSED_CLEANUP: "closed for good by `shmalloc cleanup --force` (pid {pid})",
    L.CLOSED_REPLACED: "orphaned: its daemon is gone and the endpoint is served by a daemon of another arena",
}


def close_for_good(arena, why, unless_live=False):
    """Mark the arena closed (HDR closed = `why`, a CLOSED_* value) and set every active P's stop
    byte to STOP_CLOSED: each P's next call raises ArenaClosed.  Under the registry lock, so that
    a P claimed after it is refused.  With `unless_live`, nothing is marked if a live P holds a
    slot.  Returns the active slots found (live or not): with `unless_live`, non-empty means
    the arena was left open."""
    q = arena.q
    arena.locks.raw_acquire(L.LOCK_REGISTRY)
    try:
        active = arena.registry.active_slots()
        if unless_live and any(arena.registry.alive(k) for k in active):
            return [k for k in active if arena.registry.alive(k)]
        if not q[L.HDR["closed"]]:
            q[L.HDR["closed_by"]] = os.getpid()
            q[L.HDR["closed"]] = why
        for k in active:
            q[arena.lay.slot_word(k) + SL["stop"]] = L.STOP_CLOSED
    finally:
        arena.locks.raw_release(L.LOCK_REGISTRY)
    return [] if unless_live else active


def closed_error(arena):
    """The ArenaClosed a P of a closed arena raises: why it was closed, and what to do."""
    why = arena.q[L.HDR["closed"]]
    text = _WHY.get(why, "closed for good").format(pid=arena.q[L.HDR["closed_by"]])
    return ArenaClosed(
        f"arena {arena.name} was {text}: its blocks are gone and its handles mean nothing in any "
        "other arena; close this Heap and connect again (client.connect()) for a P of the daemon "
        "serving the endpoint now"
    )


# --- the daemon's half --------------------------------------------------------------------------
class StopTheWorld:
    """The daemon's half of the handshake, on one attached arena.  The daemon drives it:

        stw.begin(epoch) -> live Ps, each asked to stop
        stw.poll(k, pid) -> "stopped" | "parked" | "left" | "dead" | None (still running)
        stw.confirm(ks)  -> the Ps of `ks` that are really stopped (see the module docstring)
        stw.end(flushed) -> every P resumed (RESYNC for the ones whose cache was flushed)

    and owns the sockets, deadlines and logging around it."""

    def __init__(self, arena, asymmetric=None):
        self.arena = arena
        self.asymmetric = membarrier_supported() if asymmetric is None else asymmetric
        self.epoch = 0
        self.live = []
        self.owed = set()
        self.stuck = []  # LockUnavailable.describe() of a lock begin() could not take

    @property
    def protocol(self):
        return "membarrier" if self.asymmetric else "cooperative"

    def fast(self, k):
        """Can P k be judged stopped from its `inside` word?"""
        return self.asymmetric and self.arena.q[self.arena.lay.slot_word(k) + SL["barrier"]] == 1

    def begin(self, epoch, only=None):
        """Take the resume lock, ask every live P to stop (with `only`, the live Ps among those),
        and issue the barrier.  Returns the Ps asked.  A P claimed after this reads
        `stopped_epoch` and starts stopped."""
        arena = self.arena
        q = arena.q
        epoch = self._take_resume_lock(epoch)  # parked Ps sleep on its byte until end()
        self.epoch = epoch
        q[L.HDR["epoch"]] = epoch
        q[L.HDR["stopped_epoch"]] = epoch
        # Read the slot table under the registry lock (a raw lock: only a read).  A daemon waits
        # for it a bounded time only: past that it reads the table as it is, and the snapshot
        # says why it is not consistent (`stuck`).
        self.stuck = []
        try:
            arena.locks.raw_acquire(L.LOCK_REGISTRY)
        except LockUnavailable as e:
            self.stuck.append(e.describe())
            live = arena.registry.active_slots()
        else:
            try:
                live = arena.registry.active_slots()
            finally:
                arena.locks.raw_release(L.LOCK_REGISTRY)
        if only is not None:
            live = [k for k in live if k in only]
        # A P whose cache an earlier flush emptied and which has not run since still owes a
        # resync: PARK overwrites its RESYNC, so remember it for end().
        self.owed = set()
        for k in live:
            sw = arena.lay.slot_word(k)
            if q[sw + SL["stop"]] == L.STOP_RESYNC:
                self.owed.add(k)
            q[sw + SL["stop_epoch"]] = epoch
            q[sw + SL["stop"]] = L.STOP_PARK
        if self.asymmetric:
            barrier()
        self.live = live
        return live

    def _take_resume_lock(self, epoch):
        """Take the resume byte of `epoch`, or of the first epoch after it whose byte is free
        (at most RESUME_LOCKS - 1 after it); returns the epoch taken.  Parked Ps hold a read
        lock on the byte as they wake, from the instant the stop is lifted until each runs
        again: on a machine with more busy processes than cores, milliseconds, which the next
        stop would otherwise wait.  Epochs need only grow.  When every byte is held, the first
        is waited for: a daemon (bounded waits: Locks.wait_s) waits that long at most; past it
        -- a P killed holding it, its description kept by a child forked from C -- the pause
        goes on without the lock, and parked Ps, finding it free while the stop stands, poll
        (park) instead."""
        fd = self.arena.fd
        for e in range(epoch, epoch + L.RESUME_LOCKS):
            if ofd_trylock(fd, L.resume_lock_byte(e)):
                return e
        wait_s = self.arena.locks.wait_s
        if wait_s is None:
            ofd_lock(fd, L.resume_lock_byte(epoch))
            return epoch
        deadline = time.monotonic() + wait_s
        while not ofd_trylock(fd, L.resume_lock_byte(epoch)) and time.monotonic() < deadline:
            time.sleep(50e-6)
        return epoch

    def poll(self, k, pid):
        """The state of P k (whose pid was `pid` at begin): None while it may still run."""
        q = self.arena.q
        sw = self.arena.lay.slot_word(k)
        if q[sw + SL["parked"]] == self.epoch:
            return "parked"
        if q[sw + SL["state"]] != L.SLOT_ACTIVE or q[sw + SL["pid"]] != pid:
            return "left"  # closed its Heap meanwhile
        if q[sw + SL["stop"]] != L.STOP_PARK:
            # It wrote RUN over a RESYNC just as we asked it to park: ask again.
            q[sw + SL["stop"]] = L.STOP_PARK
            if self.asymmetric:
                barrier()
            return None
        if self.fast(k) and not q[sw + SL["inside"]] & 0xFF:
            return "stopped"
        return None

    def inside(self, k):
        """Is P k inside an allocator call, as far as its `inside` word says now (a hint: no
        barrier)?"""
        return bool(self.arena.q[self.arena.lay.slot_word(k) + SL["inside"]] & 0xFF)

    def confirm(self, ks):
        """Of the Ps `ks` that poll() found stopped, the ones that still are after one more
        barrier (their stop reads PARK, their inside 0).  The others must be polled again."""
        if not ks:
            return []
        q, lay = self.arena.q, self.arena.lay
        if self.asymmetric:
            barrier()
        return [
            k
            for k in ks
            if q[lay.slot_word(k) + SL["parked"]] == self.epoch
            or (
                q[lay.slot_word(k) + SL["stop"]] == L.STOP_PARK
                and not q[lay.slot_word(k) + SL["inside"]] & 0xFF
            )
        ]

    def end(self, flushed):
        """Resume every P: RESYNC for the Ps in `flushed` (their local lists are stale) and for
        those that owed one from an earlier flush, RUN for the others; then lift the resume lock,
        which wakes the parked ones.  Returns time.perf_counter_ns() when the stop bytes were
        clear: the end of the pause (waking the parked Ps is their time, not the pause's)."""
        arena = self.arena
        q = arena.q
        q[L.HDR["stopped_epoch"]] = 0
        closed = q[L.HDR["closed"]]  # closed for good during the pause: every stop stays CLOSED
        for k in arena.registry.claimed():  # a P claimed during the pause is below slots_high too
            sw = arena.lay.slot_word(k)
            if k in self.live or (
                q[sw + SL["stop_epoch"]] == self.epoch and q[sw + SL["stop"]] == L.STOP_PARK
            ):
                # A P claimed during the pause started stopped; it resumes too.
                if closed and q[sw + SL["state"]] == L.SLOT_ACTIVE:
                    q[sw + SL["stop"]] = L.STOP_CLOSED
                else:
                    q[sw + SL["stop"]] = L.STOP_RESYNC if k in flushed or k in self.owed else L.STOP_RUN
        resumed = time.perf_counter_ns()  # the world runs again from here
        ofd_unlock(arena.fd, L.resume_lock_byte(self.epoch))
        return resumed
