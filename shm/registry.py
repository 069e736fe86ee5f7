"""The P-slot registry: which worker holds which slot.  See shm/__init__.py for an overview.

A worker becomes a P by claiming a FREE slot under the registry lock and taking the slot's
liveness byte (an OFD lock on byte slots_off + k of the segment's file) for its whole life.  The
kernel drops that lock when the process dies, which is how a dead P is told from a live one; the
pid is checked too, since a forked child can keep the lock's file description open after its
parent died.  A P gives its slot back when it closes; the daemon gives back the slot of a dead P
after flushing its cache (Arena.reclaim).

Slot words (layout.SLOT) written here, all under the registry lock: state, pid, gen, claimed_ns,
token (a fresh random secret per claim, zeroed at give-back),
and, at claim, every per-P word reset to its idle value.

A worker's slot -- its words and its 64 KiB undo log -- is reserved (posix_fallocate) when it is
first claimed, before anything of it is written, and HDR slots_high raised past it: slots
[0, slots_high) are the ones ever claimed (a claim takes the lowest free slot), and every reader
of slot words stays below it (`claimed`).  A slot above it was never touched: a read of its
pages would make tmpfs allocate them, and on a full /dev/shm is SIGBUS.  The daemon's and the
registry's actor slots (nslots, nslots+1) are reserved with the arena.
"""

import os
import time

from . import layout as L
from . import world
from .errors import CorruptionError, NoFreeSlot
from .heap import reserve
from .locks import ofd_held_elsewhere, ofd_trylock, ofd_unlock

SL = L.SLOT
# Slot words a FREE slot must hold at zero: anything else is a cache or buffer nobody flushed.
_MUST_BE_ZERO = (
    "log_used",
    "rfree_n",
    "lg_head",
    "lg_relists",
    "lg_relist_pages",
    "lg_pending",
    "lg_pend_head",
    "lg_pend_pages",
)


class Registry:
    """The slot table of one attached arena."""

    def __init__(self, arena):
        self.arena = arena
        self.q = arena.q
        self.lay = arena.lay

    def liveness_byte(self, k):
        """File byte locked by the live owner of slot k for its whole life."""
        return self.lay.slots_off + k

    def claimed(self):
        """The worker slots ever claimed, range(HDR slots_high): the only ones whose pages are
        reserved, so the only ones a reader may touch (a slot above is FREE, idle and zero)."""
        return range(self.q[L.HDR["slots_high"]])

    def actors(self):
        """Every actor whose slot is reserved: the claimed worker slots, then the daemon's and
        the registry's (an undo log may only be non-empty in one of these)."""
        return [*self.claimed(), self.lay.nslots, self.lay.nslots + 1]

    def state(self, k):
        """SLOT_* of slot k; SLOT_FREE for a slot never claimed (nothing of it is read)."""
        if not 0 <= k < self.q[L.HDR["slots_high"]]:
            return L.SLOT_FREE
        return self.q[self.lay.slot_word(k) + SL["state"]]

    def pid(self, k):
        return self.q[self.lay.slot_word(k) + SL["pid"]] if k in self.claimed() else 0

    def token(self, k):
        """The secret of slot k's current claim (0 while FREE): see layout.SLOT["token"]."""
        return self.q[self.lay.slot_word(k) + SL["token"]] if k in self.claimed() else 0

    def active_slots(self):
        # Every claimed slot's state word in one strided read: the daemon asks this of requests
        # it may refuse, so it must stay cheap.
        stride, first = self.lay.slot_words, self.lay.slot_word(0) + SL["state"]
        states = self.q[first : first + len(self.claimed()) * stride : stride].tolist()
        return [k for k, st in enumerate(states) if st == L.SLOT_ACTIVE]

    def alive(self, k):
        """An ACTIVE slot is alive while its owner holds the liveness lock and its pid exists."""
        if self.state(k) != L.SLOT_ACTIVE:
            return False
        if not ofd_held_elsewhere(self.arena.fd, self.liveness_byte(k)):
            return False
        try:
            os.kill(self.pid(k), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def is_idle(self, k):
        """Slot k caches no span and holds no buffered work (a FREE slot must be idle)."""
        q, sw = self.q, self.lay.slot_word(k)
        if any(q[sw + L.SLOT_CACHED_AT : sw + L.SLOT_CACHED_AT + L.NCLASS].tolist()):
            return False
        if any(q[sw + L.SLOT_RELISTS_AT : sw + L.SLOT_RELISTS_AT + L.NCLASS].tolist()):
            return False
        return not any(q[sw + SL[n]] for n in _MUST_BE_ZERO)

    def check(self):
        """Every FREE slot is idle (caches nothing, buffers nothing, owes no undo log) and every
        ACTIVE one names a pid.  Returns the problems (Arena.check_all)."""
        bad = []
        high = self.q[L.HDR["slots_high"]]
        if high > self.lay.nslots:
            bad.append(f"slots_high {high} is past the {self.lay.nslots} worker slots")
        for k in self.claimed():
            st = self.state(k)
            if st == L.SLOT_FREE and not self.is_idle(k):
                bad.append(f"slot {k} is FREE but still caches spans or holds buffered work")
            elif st == L.SLOT_ACTIVE and not self.pid(k):
                bad.append(f"slot {k} is ACTIVE but names no pid")
            elif st not in (L.SLOT_FREE, L.SLOT_ACTIVE):
                bad.append(f"slot {k} is in state {st}")
        return bad

    def claim(self, barrier=False):
        """Become a P: take a free slot, lock its liveness byte.  `barrier`: this process
        registered for membarrier (shm/world.py).  Returns the slot index."""
        arena, pid = self.arena, os.getpid()

        def claim(op):
            op.acquire(L.LOCK_REGISTRY)
            q = self.q
            if q[L.HDR["closed"]]:
                raise world.closed_error(arena)  # closed for good: no new P (world.close_for_good)
            high = q[L.HDR["slots_high"]]
            for k in range(min(high + 1, self.lay.nslots)):
                sw = self.lay.slot_word(k)
                if k == high:
                    # Never claimed: FREE, idle and untouched.  Reserve it whole before anything
                    # of it is written; a full /dev/shm is OutOfMemory with the registry as it was.
                    reserve(
                        arena.fd,
                        [self.lay.slot_range(k)],
                        f"P slot {k} ({self.lay.slot_words * L.WORD >> 10} KiB with its undo log)",
                        "free space in /dev/shm, or close a worker to reuse its slot",
                    )
                    if not ofd_trylock(arena.fd, self.liveness_byte(k)):
                        continue
                    op.w(L.HDR["slots_high"], k + 1)
                elif q[sw + SL["state"]] != L.SLOT_FREE:
                    continue
                elif not ofd_trylock(arena.fd, self.liveness_byte(k)):
                    continue  # given back, but its old owner's lock is still draining
                elif not self.is_idle(k):
                    ofd_unlock(arena.fd, self.liveness_byte(k))
                    raise CorruptionError(f"slot {k} is FREE but still caches spans or holds buffered work")
                now = time.time_ns()
                op.w(sw + SL["state"], L.SLOT_ACTIVE)
                op.w(sw + SL["pid"], pid)
                op.add(sw + SL["gen"], 1)
                op.w(sw + SL["claimed_ns"], now)
                op.w(sw + SL["token"], int.from_bytes(os.urandom(8), "little") or 1)
                op.w(sw + SL["heartbeat_ns"], now)
                op.w(sw + SL["parked"], 0)
                op.w(sw + SL["inside"], 0)
                op.w(sw + SL["barrier"], 1 if barrier else 0)
                # Claimed while the world is stopped: start stopped, so the new P's first call
                # waits for the resume (the daemon lifts every stop of its epoch).
                stopped = q[L.HDR["stopped_epoch"]]
                op.w(sw + SL["stop_epoch"], stopped)
                op.w(sw + SL["stop"], L.STOP_PARK if stopped else L.STOP_RUN)
                return k
            raise NoFreeSlot(f"all {self.lay.nslots} P slots of arena {arena.name} are taken")

        return arena.run(arena.registry_actor, claim)

    def give_back(self, k):
        """Give slot k back (its owner closing, or the daemon after reclaiming a dead P): its cache
        must already be flushed."""
        if not self.is_idle(k):
            raise CorruptionError(f"give-back of slot {k}, which still caches spans or holds buffered work")

        def give_back(op):
            op.acquire(L.LOCK_REGISTRY)
            sw = self.lay.slot_word(k)
            op.w(sw + SL["state"], L.SLOT_FREE)
            op.w(sw + SL["pid"], 0)
            op.w(sw + SL["token"], 0)
            op.w(sw + SL["stop"], L.STOP_RUN)
            op.w(sw + SL["barrier"], 0)

        self.arena.run(self.arena.registry_actor, give_back)
        try:  # a no-op for the daemon, which never held a dead P's liveness lock
            ofd_unlock(self.arena.fd, self.liveness_byte(k))
        except OSError:
            pass
