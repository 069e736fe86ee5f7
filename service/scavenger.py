"""The background scavenger: idle heap pages go back to the OS by themselves.  See
shm/__init__.py for the allocator's overview.

Go's background scavenger, run from the daemon's loop: every step takes the heap lock once and
releases (MADV_REMOVE, as `release` does) at most a bounded number of pages from at most
MAX_SPANS free spans -- the ones idle longest first (PageHeap's idle list), and none freed less
than MIN_IDLE_S ago -- leaving `retain` idle bytes committed for reuse.  The step's work (its CPU time) is measured and the pages per
step adapt to keep it near HOLD_TARGET_NS, well under the millisecond a step may hold the heap
lock; steps are paced to take at most DUTY of the daemon's time while there is work, so a ping
or a snapshot request waits at most one step.  Where the daemon may (CAP_SYS_NICE, as for the
pause) a step runs SCHED_FIFO, so that a loaded machine does not preempt it while it holds the
lock; the longest wall-clock hold is in the snapshot (scavenge_hold_ns).

It runs in the daemon's own thread, between requests: never during a stop of the world (the
pause is a call of that same thread, and a step also refuses while the header says a stop is in
progress), and never beside another daemon operation on the daemon's undo log.

--retain: a size ("64M") or a fraction of the heap's peak ("5%": of heap_sys, the committed
heap, which never shrinks).  The default, 5% of the peak, keeps enough committed for the next
burst of a workload that frees and allocates in waves to start without a page fault per span,
and little enough that a heap emptied after a peak comes back to a twentieth of it.
"""

import time

from shm import layout as L
from shm.errors import StartupError

from .pause import set_realtime

DEFAULT_RETAIN = "5%"
HOLD_TARGET_NS = 400_000  # aim of one step's heap-lock hold; the bound is 1 ms
MIN_PAGES, MAX_PAGES, FIRST_PAGES = 8, 1024, 128
MAX_SPANS = 8  # free spans touched in one step: each costs tens of microseconds of bookkeeping
DUTY = 0.05  # while there is work: at most this share of the daemon's time
MIN_GAP_S = 0.002  # least time between two steps
IDLE_POLL_S = 0.1  # how often an idle scavenger looks again (a read of three words)
MIN_IDLE_S = 1.0  # a free span younger than this is left alone: a workload that frees and
# allocates blocks of one size (a producer and a consumer) takes it again within milliseconds,
# and would otherwise pay a posix_fallocate, a page fault and a zeroed page for every one of its
# pages (4 MiB hand-offs ran at a third of their rate without this)
H = L.HEAP
PAGE = L.PAGE_SIZE


def parse_retain(text):
    """'64M', '1G', a number of bytes, or '5%' (of the peak) -> ("bytes", n) or ("fraction", f)."""
    t = str(text).strip()
    if t.endswith("%"):
        try:
            f = float(t[:-1]) / 100
        except ValueError:
            f = -1.0
        if not 0 <= f <= 1:
            raise StartupError(f"--retain {text!r}: a percentage must be between 0% and 100%")
        return "fraction", f
    from .daemon import parse_size

    try:
        return "bytes", parse_size(t)
    except StartupError:
        if t in ("0", "0B"):
            return "bytes", 0
        raise StartupError(
            f"--retain {text!r}: say 64M, 1G, a number of bytes, or a percentage like 5%"
        ) from None


class Scavenger:
    """The daemon's background scavenger over `arena` (service/daemon.py calls `tick`)."""

    def __init__(self, arena, retain=DEFAULT_RETAIN, actor=None, realtime=False):
        self.arena = arena
        self.realtime = realtime  # run each step SCHED_FIFO (the daemon may: CAP_SYS_NICE)
        self.kind, self.value = parse_retain(retain)
        self.actor = arena.daemon_actor if actor is None else actor
        self.pages = FIRST_PAGES
        self.next_at = 0.0
        self.steps = 0
        arena.q[L.HDR["scavenge_hold_ns"]] = 0  # since this daemon started
        self.publish()

    def target(self):
        """Bytes of idle heap to keep committed, whole pages."""
        if self.kind == "bytes":
            return self.value
        heap_sys = self.arena.q[self.arena.lay.heap_word() + H["committed_pages"]] * PAGE
        return int(heap_sys * self.value) // PAGE * PAGE

    def publish(self):
        """Write the target where the snapshot reads it (a share of the peak follows heap_sys);
        the daemon calls it before every snapshot reads the figures.  Returns it."""
        target = self.target()
        self.arena.q[L.HDR["retain_target"]] = target
        return target

    def wait(self, now):
        """Seconds until the next step is due."""
        return max(0.0, self.next_at - now)

    def tick(self, now=None):
        """One step if it is due and there is work: returns the pages released."""
        now = time.monotonic() if now is None else now
        if now < self.next_at:
            return 0
        q, hw = self.arena.q, self.arena.lay.heap_word()
        if q[L.HDR["stopped_epoch"]]:  # never during a stop of the world
            self.next_at = now + MIN_GAP_S
            return 0
        keep = self.publish() // PAGE
        # A hint read without the lock; the step reads the same words again under it.
        idle = q[hw + H["committed_pages"]] - q[hw + H["inuse_pages"]] - q[hw + H["released_pages"]]
        if idle <= keep:
            self.next_at = now + IDLE_POLL_S
            return 0
        want = self.pages
        rt = self.realtime and set_realtime(True)  # not preempted while it holds the heap lock
        cpu = time.thread_time_ns()
        try:
            pages, hold = self.arena.scavenge_step(
                self.actor,
                want,
                keep,
                MAX_SPANS,
                background=True,
                freed_before=int((now - MIN_IDLE_S) * 1e9),
            )
        finally:
            cpu = time.thread_time_ns() - cpu
            if rt:
                set_realtime(False)
        self.steps += 1
        if hold > q[L.HDR["scavenge_hold_ns"]]:
            q[L.HDR["scavenge_hold_ns"]] = hold
        # The step's own work sets the pace and the size: on a loaded machine the wall-clock
        # hold also counts the time the daemon was preempted, which fewer pages would not cut.
        if cpu > HOLD_TARGET_NS:
            self.pages = max(MIN_PAGES, self.pages // 2)
        elif cpu < HOLD_TARGET_NS // 2 and pages >= want:
            self.pages = min(MAX_PAGES, self.pages * 2)
        # Nothing old enough: look again later, not at the pace of a step that had work.
        self.next_at = now + (max(MIN_GAP_S, cpu / 1e9 / DUTY) if pages else IDLE_POLL_S)
        return pages
