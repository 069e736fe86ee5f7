"""Channels: a ring of block handles inside the heap, from one process to one other.

A pipe or a queue that carries handles costs two system calls a batch and wakes the other side;
the blocks then come back to their owner through the remote-free buffers.  A channel does both in
the arena.  It is one block of the heap holding a ring of (handle, bytes) slots, written by one
sender and read by one receiver:

    line 0   MAGIC, capacity, tail (messages sent), the sender's pid and start time, closed
    line 1   head (messages released), the receiver's pid and start time, closed, torn down
    slots    capacity handles, then capacity byte counts: message m's at m % capacity

Sending writes the slot, then the tail; receiving reads the tail, then the slot, and gives a view
of the block; releasing moves the head.  The slots from the sender's `freed` cursor to the head
hold released messages: the sender frees those blocks itself at its next send -- a local free,
on its own fast path -- and zeroes each slot first (a crash between leaks the block, never frees
it twice).  So a message costs no lock and no system call, and its block goes back to the
process that allocated it, as iceoryx2's samples go back to their publisher and snmalloc's
remote frees to their owner.

Memory order: the sender's stores (the block's bytes, the slot, the tail) must reach the receiver
in that order, and the receiver's loads (tail, slot, bytes) be made in that order.  x86-64 keeps
both orders for plain stores and loads; arm64 does not, and Python has no fence, so channels
are refused there (ChannelUnsupported).

The ends: the process that makes the channel is its sender, for its life.  The receiver is the
process that opens it (`Channel.open`), one at a time: its pid and start time are written under
the registry lock, and a later open succeeds only when that process is gone -- it then starts at
the head, so a message received but not released is received again.  The last end to close --
or the one that closes after the other died -- frees every block still in the ring and the ring;
the decision is made under the registry lock, so exactly one does.  A channel whose two ends both
die without closing leaks its blocks, as any block a dead process held does.
"""

import os
import platform
import time
import weakref
from array import array
from collections.abc import Callable
from typing import Literal, SupportsIndex

from . import layout as L
from .cache import Block, ProcessCache, _handle
from .errors import (
    BadHandle,
    ChannelBusy,
    ChannelClosed,
    ChannelUnsupported,
    CorruptionError,
    DoubleFree,
    ForkedHeap,
)
from .locks import holder_alive, my_start

MAGIC = 0x316E_6168_6363_6873  # b"shcchan1"
SLOTS_AT = 16  # words: the slots start after the two lines
# line 0 (the sender writes it)
W_MAGIC, W_CAP, W_TAIL, W_SPID, W_SSTART, W_SCLOSED = 0, 1, 2, 3, 4, 5
# line 1 (the receiver writes it; torn down by the last to close, under the registry lock)
W_HEAD, W_RPID, W_RSTART, W_RCLOSED, W_TORN = 8, 9, 10, 11, 12
MAX_CAPACITY = 1 << 20
SPINS = 64  # an empty (or full) ring is looked at again after sched_yield() this many times, then
BACKOFF_S = (20e-6, 1e-3)  # after sleeps doubling from the first to the second, which bounds the
# latency of a message to an idle receiver; the other end is checked for life at each sleep
_SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")
_RECEIVING: set[tuple[int, int, int]] = set()  # (pid, arena id, handle) of the receiving ends open


def _whole(heap, h):
    """The capacity of the live block at handle h (raises if there is none)."""
    v = heap.view(h)
    n = v.nbytes
    v.release()
    return n


def _ring_word(lay, h):
    """The word index of line 0 of the ring in the block at handle h: its first cache line."""
    return ((lay.heap_off + lay.handle_offset(h) + 63) & ~63) // 8


def ring_bytes(capacity):
    """Bytes of the block a channel of `capacity` slots takes (alignment slack included)."""
    return 64 + (SLOTS_AT + 2 * capacity) * 8


class Channel:
    """One end of a channel (see the module's docstring).  `heap.channel()` makes one and is its
    sender; `heap.open_channel(handle)` opens the receiving end in another process.  An end is
    used by one thread at a time.  send(), recv(), release() and take() are closures over the
    ring's words and the end's counters (made by _bind), as the heap's fast path is."""

    send: Callable[..., None]
    loan: Callable[..., memoryview]
    commit: Callable[[], None]
    cancel: Callable[[], None]
    recv: Callable[..., memoryview]
    release: Callable[[], None]
    take: Callable[[], Block]

    def __init__(self, heap: ProcessCache, handle: int, role: str) -> None:
        self.heap, self.handle, self.role = heap, handle, role
        arena = heap.arena
        self._b = _ring_word(arena.lay, handle)
        self.capacity = arena.q[self._b + W_CAP]
        self._w = arena.words(self._b, SLOTS_AT + 2 * self.capacity)
        self._pid = os.getpid()
        self._closed = False
        self._bind()
        _ENDS.add(self)

    def _bind(self):
        heap, w, cap, role = self.heap, self._w, self.capacity, self.role
        arena = heap.arena
        lay = arena.lay
        mv, hb, heap_end = arena.mv, lay.heap_off, lay.heap_off + lay.heap_max
        C0, GB, G0 = lay.handle_c0, L.GEN_BITS, L.HANDLE_G0
        own_view, free = heap._own_view, heap.free
        # The sender: messages sent; messages whose blocks it freed (the slots behind are zero or
        # unused).  The receiver: the next message to receive; the head as it last wrote it; the
        # tail as it last read it.
        tail = w[W_TAIL]
        freed = nxt = head = seen = w[W_HEAD]
        loaned = False  # a loan() not committed: its block in the slot at the tail
        last = 0  # the handle of the message recv() returned last
        alloc = heap.alloc

        def send(block, nbytes=None, timeout=None):
            """Hand `block` (a Block, or an int handle) to the receiver: its first `nbytes`
            bytes (default: the Block's size, or an int handle's whole capacity).  The block is
            the channel's from here on: the sender must not use or free it; once the receiver
            releases the message, the sender frees it at a later send or at close.  Waits while
            the ring is full (TimeoutError after `timeout` seconds) -- also while its
            receiver is dead, for another may open it; ChannelClosed once the receiver
            closed it.  On any error the block is still the caller's, and nothing was sent."""
            nonlocal tail
            if loaned:
                raise ValueError("send() while a loan() is not committed: commit() it first")
            if block.__class__ is Block and block[3] is heap:
                h = block[0]
                n = block[1] if nbytes is None else nbytes
            else:
                h = _handle(block, heap)
                n = _whole(heap, h) if nbytes is None else nbytes
            if self._closed or w[W_RCLOSED] or role != "send":
                raise ChannelClosed(f"send() on channel {self.handle}: " + self._why_not_send())
            own_view(h, n).release()  # raises unless h is a live block of at least n bytes
            make_room(timeout)
            t = tail
            s = SLOTS_AT + t % cap
            w[s] = h
            w[s + cap] = n
            tail = t + 1
            w[W_TAIL] = t + 1  # last: the message is sent

        def loan(size, timeout=None):
            """A new block of `size` bytes, in the next message's slot: a zero-copy memoryview
            of it to fill, then commit() sends it -- iceoryx2's loan and send.  The block is the
            channel's already: no check of it at commit.  One loan at a time; waits for room
            as send() does; OutOfMemory if the heap has no room (nothing changed then)."""
            nonlocal loaned
            if self._closed or w[W_RCLOSED] or role != "send":
                raise ChannelClosed(f"loan() on channel {self.handle}: " + self._why_not_send())
            if loaned:
                raise ValueError("loan() while another loan() is not committed: commit() or cancel() it")
            make_room(timeout)
            h = alloc(size)[0]
            s = SLOTS_AT + tail % cap
            w[s] = h  # past the tail: the receiver does not look, and the last end frees it
            w[s + cap] = size
            loaned = True
            i = h >> GB
            d = (((i - G0) << 3) if i < C0 else ((i - C0) << 7)) + hb
            return mv[d : d + size]

        def commit():
            """Send the block loan() gave (its views may not be used after)."""
            nonlocal tail, loaned
            if not loaned:
                raise ValueError("commit(): no loan() to send")
            loaned = False
            tail += 1
            w[W_TAIL] = tail  # the message is sent

        def cancel():
            """Free the block of a loan() not committed (close() does it too)."""
            nonlocal loaned
            if loaned:
                s = SLOTS_AT + tail % cap
                x = w[s]
                w[s] = 0
                loaned = False
                free(x)

        def make_room(timeout, wait=True):
            """Wait (with `wait`) until the slot at the tail is free -- the message sent `cap`
            before released -- then free the blocks of the messages released since the last
            call: the sender's own frees of what the receiver gave back."""
            nonlocal freed
            f, top = freed, w[W_HEAD]
            if wait and tail - top >= cap:
                t = tail
                self._wait(lambda: t - w[W_HEAD] < cap, timeout, "no room in the ring")
                top = w[W_HEAD]
            while f < top:
                s = SLOTS_AT + f % cap
                x = w[s]
                if x:
                    w[s] = 0  # first: a crash after it leaks the block, never frees it twice
                    freed = f + 1  # before the free, which may raise: the slot is done with
                    free(x)
                f += 1
            freed = f

        def recv(timeout=None):
            """A zero-copy memoryview of the next message, waiting for one (TimeoutError after
            `timeout` seconds; ChannelClosed when the sender closed or died and none is left).
            It stays valid until the message is released (release(), or take())."""
            nonlocal nxt, seen, last
            while True:
                n = nxt
                if n == seen:
                    if role != "recv" or self._closed or heap._dead:
                        self._refuse("recv")
                    seen = w[W_TAIL]
                    if n == seen:
                        self._wait(lambda n=n: w[W_TAIL] != n, timeout, "no message")
                        seen = w[W_TAIL]
                s = SLOTS_AT + n % cap
                h, size = w[s], w[s + cap]
                nxt = n + 1
                i = h >> GB
                d = (((i - G0) << 3) if i < C0 else ((i - C0) << 7)) + hb
                if h and hb <= d <= heap_end - size:
                    last = h
                    return mv[d : d + size]
                if h or n != head:
                    raise CorruptionError(
                        f"channel {self.handle}: message {n} names {size} bytes at handle {h}"
                    )
                release()  # emptied by take() in a receiver that died before it released it

        def release():
            """Release the oldest message received and not yet released: its block goes back
            to the sender, which frees it.  Views of it must not be used after."""
            nonlocal head
            if head == nxt:
                raise ValueError("release(): no message received and not yet released")
            head += 1
            w[W_HEAD] = head

        def take():
            """Take the oldest message received and not yet released out of the channel: its
            Block, which the caller now owns and frees (the sender will not)."""
            if head == nxt:
                raise ValueError("take(): no message received and not yet released")
            s = SLOTS_AT + head % cap
            h, size = w[s], w[s + cap]
            capacity = arena.block_capacity(h)  # raises unless it is a live block
            w[s] = 0  # first: a crash after it leaves the message released with nothing to free
            release()
            return Block((h, size, capacity, heap))

        def pending():
            return tail - w[W_HEAD] if role == "send" else nxt - head

        def last_handle():
            return last

        def loaned_handle():
            return w[SLOTS_AT + tail % cap] if loaned else 0

        def shut():
            """After close: the next recv() looks at the end's state, and refuses."""
            nonlocal seen
            seen = nxt

        self.send, self.recv, self.release, self.take = send, recv, release, take
        self.loan, self.commit, self.cancel = loan, commit, cancel
        self._make_room, self._pending, self._shut = make_room, pending, shut
        self._last, self._loaned = last_handle, loaned_handle

    @property
    def pending(self) -> int:
        """Messages sent and not yet released (the sender's count), or received and not yet
        released (the receiver's)."""
        return self._pending()

    @property
    def last_handle(self) -> int:
        """The handle of the block whose view recv() returned last (0 before the first)."""
        return self._last()

    @property
    def loaned_handle(self) -> int:
        """The handle of the block of the loan() not yet committed (0 if none)."""
        return self._loaned()

    def _why_not_send(self):
        if self.role != "send":
            return "this is its receiving end"
        return "this end is closed" if self._closed else "its receiver closed it"

    def _refuse(self, call):
        if self.heap._dead:
            self.heap._check_view()  # closed or forked heap: raises
        raise ChannelClosed(f"{call}() on a closed or sending end of channel {self.handle}")

    # --- making and opening ------------------------------------------------------------------
    @classmethod
    def create(cls, heap: ProcessCache, capacity: int = 256) -> "Channel":
        """A new channel in `heap`'s arena, of `capacity` messages in flight; the caller is its
        sender."""
        if not _SUPPORTED:
            raise ChannelUnsupported(
                f"channels rely on x86-64's store and load order; this is {platform.machine()}: "
                "pass handles over a Pipe or a Queue instead"
            )
        if capacity.__class__ is not int or not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"a channel's capacity is an int in [1, {MAX_CAPACITY}], got {capacity!r}")
        blk = heap.alloc(ring_bytes(capacity))
        arena = heap.arena
        b, n, q, me = _ring_word(arena.lay, blk.handle), SLOTS_AT + 2 * capacity, arena.q, os.getpid()
        q[b : b + n] = array("Q", bytes(8 * n))
        q[b + W_CAP], q[b + W_SPID], q[b + W_SSTART] = capacity, me, my_start(me)
        q[b + W_MAGIC] = MAGIC  # last: a channel half made is no channel
        return cls(heap, blk.handle, "send")

    @classmethod
    def open(cls, heap: ProcessCache, handle: SupportsIndex) -> "Channel":
        """The receiving end of the channel at `handle`, for this process.  BadHandle if no
        channel is there; ChannelBusy while another live process has it open; ChannelClosed
        once its receiver closed it, or it was torn down."""
        if not _SUPPORTED:
            raise ChannelUnsupported(
                f"channels rely on x86-64's store and load order; this is {platform.machine()}"
            )
        h = handle.__index__()
        size = _whole(heap, h)  # raises BadHandle unless a live block is there
        b, q = _ring_word(heap.arena.lay, h), heap.arena.q
        cap = q[b + W_CAP]
        if q[b + W_MAGIC] != MAGIC or not 1 <= cap <= MAX_CAPACITY or size < ring_bytes(cap):
            raise BadHandle(f"handle {h} names a block of {size} bytes that holds no channel")
        me, start = os.getpid(), my_start(os.getpid())
        key = (me, heap.arena.arena_id, h)
        if key in _RECEIVING:
            raise ChannelBusy(f"channel {h} is open for receiving in this process already")

        def claim(op):
            op.acquire(L.LOCK_REGISTRY)
            if q[b + W_TORN] or q[b + W_RCLOSED]:
                raise ChannelClosed(f"channel {h} was closed by its receiver")
            pid, begun = q[b + W_RPID], q[b + W_RSTART]
            if pid and pid != me and holder_alive(pid, begun):
                raise ChannelBusy(f"channel {h} is open for receiving in process {pid}")
            op.wset((b + W_RPID, b + W_RSTART), (me, start))

        heap._call(lambda _: heap.arena.run(heap.slot, claim), None)
        _RECEIVING.add(key)
        return cls(heap, h, "recv")

    # --- waiting -----------------------------------------------------------------------------
    def _wait(self, ready, timeout, what):
        deadline = None if timeout is None else time.monotonic() + timeout
        sleep, yield_cpu, spins, delay = time.sleep, os.sched_yield, 0, BACKOFF_S[0]
        while not ready():
            if spins < SPINS:
                spins += 1
                yield_cpu()  # sched_yield: a process that shares this CPU -- the other end,
                # it may be -- runs first (sleep(0) would take the CPU back at once)
                continue
            gone = self._peer_gone()
            if gone and not ready():
                raise ChannelClosed(f"channel {self.handle}: {gone}")
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"channel {self.handle}: {what} within {timeout} s")
            sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])

    def _peer_gone(self):
        """Why the other end will never act again (closed, died, the channel torn down), or ''."""
        w = self._w
        if w[W_TORN]:
            return "torn down"
        if self.role == "send":  # a receiver that died may be replaced (open): wait on
            return "its receiver closed it" if w[W_RCLOSED] else ""
        if w[W_SCLOSED]:
            return "its sender closed it and every message was received"
        if not holder_alive(w[W_SPID], w[W_SSTART]):
            return f"its sender (pid {w[W_SPID]}) died and every message was received"
        return ""

    # --- closing -----------------------------------------------------------------------------
    def close(self) -> None:
        """Close this end.  The sender first frees what the receiver released.  The last end to
        close (or one closing after the other end died) frees every block left in the ring and
        the ring itself; before that, the receiver may still drain what was sent."""
        if self._closed:  # closed, or inherited through fork (_after_fork_in_child)
            return
        heap = self.heap
        if self.role == "send":
            self.cancel()
            self._make_room(None, wait=False)  # free what the receiver released
        b, q = self._b, heap.arena.q
        mine = W_SCLOSED if self.role == "send" else W_RCLOSED

        def mark(op):
            op.acquire(L.LOCK_REGISTRY)
            if q[b + W_TORN]:
                return False
            if self.role == "send":
                other = q[b + W_RPID] and (
                    q[b + W_RCLOSED] or not holder_alive(q[b + W_RPID], q[b + W_RSTART])
                )
            else:
                other = q[b + W_SCLOSED] or not holder_alive(q[b + W_SPID], q[b + W_SSTART])
            op.wset((b + mine, b + W_TORN), (1, 1 if other else 0))
            return bool(other)

        last = heap._call(lambda _: heap.arena.run(heap.slot, mark), None)
        self._closed = True
        self._shut()
        _RECEIVING.discard((self._pid, heap.arena.arena_id, self.handle))
        if last:
            self._tear_down()

    def _tear_down(self):
        """Free every block left in the ring, then the ring (the last end, the channel torn down
        under the registry lock: nobody else does it)."""
        q, free, b = self.heap.arena.q, self.heap.free, self._b
        cap, bad = q[b + W_CAP], []
        for s in range(b + SLOTS_AT, b + SLOTS_AT + cap):
            h = q[s]
            if h:
                q[s] = 0  # first, as in send()
                try:
                    free(h)
                except BadHandle:  # freed already: a block sent, then freed by hand
                    bad.append(h)
        self.heap.free(self.handle)
        if bad:
            raise DoubleFree(
                f"channel {self.handle}: {len(bad)} blocks sent on it were freed elsewhere "
                f"(a sent block is the channel's): {bad[:8]}; the rest and the ring are freed"
            )

    def __enter__(self) -> "Channel":
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.pending} pending"
        return f"<Channel {self.handle} {self.role}, capacity {self.capacity}, {state}>"


_ENDS: "weakref.WeakSet[Channel]" = weakref.WeakSet()


def _after_fork_in_child():
    """An end inherited through fork() is its parent's: every call of it refuses in the child,
    where it would move the parent's counters (and close() does nothing)."""
    for end in list(_ENDS):

        def refuse(*args, _h=end.handle, **kw):
            raise ForkedHeap(f"channel {_h}: this end belongs to the parent process; open one here")

        end.send = end.loan = end.commit = end.cancel = end.recv = end.release = end.take = refuse
        end._closed = True


os.register_at_fork(after_in_child=_after_fork_in_child)
