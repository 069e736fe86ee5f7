"""What a client that is refused again and again may cost the daemon.  See shm/__init__.py for
the allocator's overview and docs/ARCHITECTURE.md ("Who may do what") for the rules.

A refusal is an error reply the client earned: a protocol error (BAD_FRAME, TOO_LARGE,
BAD_REQUEST, BAD_VERSION, UNKNOWN_OP, BAD_ARGS), FORBIDDEN or NOT_REGISTERED.  Each is charged
to two budgets, token buckets refilled with time: its sender's (keyed by the ZeroMQ routing
identity) and a global one, which catches a client that changes identity (a fresh socket per
request).  Within both budgets the refusal is sent at once.  Beyond either, the same reply is
held for `delay` seconds and sent by the serve loop's timer (a tarpit): a client that waits for
its replies -- a REQ, or a DEALER with N requests in flight -- slows itself to N requests per
delay.  Requests that can succeed are never charged nor held, and the ROUTER's fair queueing
still reads every peer in turn, so a worker's heartbeat waits behind at most one request of
each other peer.  Held replies are bounded per identity and in all; a refusal beyond either
bound is not answered (counted; the daemon logs it at a bounded rate).

A frame whose refusal depends on the frame alone (a protocol error: the id is in the frame) is
remembered by its bytes: the same garbage again is refused from that table, without unpacking.

    Intake(rate, burst, global_rate, global_burst, delay, clock=time.monotonic)
        early(frame) -> reply | None       the remembered refusal of these exact bytes (counted)
        remember(frame, reply)             remember the refusal of a frame, if small enough
        malformed()                        count a message of no shape, dropped undecoded
        admit(identity) -> bool            charge one refusal; True: send it now, False: hold it
        hold(identity, env, reply) -> bool held until now + delay; False: dropped (a bound)
        due() -> [(env, reply)]            the held replies whose time has come, oldest first
        flush() -> [(env, reply)]          every held reply (the daemon is stopping)
        next_due                           clock time of the oldest held reply, or None
        counts() -> dict                   refused, early, held, dropped, waiting
    Budgets(rate, burst, clock)            token buckets by identity, for the stats requests a
        admit(identity) -> bool            client may make at will (the daemon's late queue)

Every count is since start; `refused` includes the early and held ones.
"""

import collections
import time

# Error codes a client earns by what it sent; INTERNAL and the allocator's errors are the
# daemon's own, never charged.
REFUSALS = frozenset(
    {
        "BAD_FRAME",
        "TOO_LARGE",
        "BAD_REQUEST",
        "BAD_VERSION",
        "UNKNOWN_OP",
        "BAD_ARGS",
        "FORBIDDEN",
        "NOT_REGISTERED",
    }
)
MAX_IDENTITIES = 4096  # budgets kept; beyond, those of identities with nothing held are forgotten
MAX_HELD_PER_IDENTITY = 1024  # replies held for one identity
MAX_HELD = 16384  # replies held in all (a reply is about 150 bytes)
MAX_REMEMBERED = 1024  # frames whose refusal is remembered; the table is emptied when full
MAX_REMEMBERED_FRAME = 512  # bytes: larger frames are not remembered


class Bucket:
    """A token bucket: `burst` tokens at most, `rate` more a second; and how many replies of its
    identity wait in the tarpit."""

    __slots__ = ("tokens", "stamp", "held")

    def __init__(self, burst, now):
        self.tokens = float(burst)
        self.stamp = now  # clock time the tokens were last brought up to date
        self.held = 0

    def refill(self, rate, burst, now):
        """Bring the tokens up to `now`; True when one is there to spend."""
        self.tokens = min(burst, self.tokens + (now - self.stamp) * rate)
        self.stamp = now
        return self.tokens >= 1


class Intake:
    """The refusal budgets, the tarpit and the table of remembered refusals (see the module)."""

    def __init__(self, rate, burst, global_rate, global_burst, delay, clock=time.monotonic):
        for what, x in (("rate", rate), ("burst", burst), ("global rate", global_rate)):
            if not x >= 0:
                raise ValueError(f"refusal budget: {what} must be at least 0, got {x}")
        if not global_burst >= 0 or not delay >= 0:
            raise ValueError(f"refusal budget: global burst {global_burst} and delay {delay} must be >= 0")
        self.rate, self.burst = rate, burst
        self.global_rate, self.global_burst = global_rate, global_burst
        self.delay = delay
        self.clock = clock
        self.buckets = {}  # identity -> Bucket
        self.everyone = Bucket(global_burst, clock())
        self.held = collections.deque()  # (due, identity, env, reply), due nondecreasing
        self.remembered = {}  # frame bytes -> reply bytes
        self.refused = self.early_count = self.held_count = self.dropped = 0

    # --- refusals decided by the frame alone ------------------------------------------------
    def early(self, frame):
        reply = self.remembered.get(frame)
        if reply is not None:
            self.early_count += 1
        return reply

    def remember(self, frame, reply):
        if len(frame) > MAX_REMEMBERED_FRAME:
            return
        if len(self.remembered) >= MAX_REMEMBERED:
            self.remembered.clear()
        self.remembered[bytes(frame)] = reply

    def malformed(self):
        """A message of the wrong shape, dropped unanswered before any frame was decoded."""
        self.refused += 1
        self.early_count += 1

    # --- the budgets --------------------------------------------------------------------------
    def admit(self, identity):
        """Charge one refusal to `identity` and to everyone: True when both budgets had a token
        (then both are spent), False when the refusal must wait in the tarpit."""
        self.refused += 1
        now = self.clock()
        b = self.buckets.get(identity)
        if b is None:
            if len(self.buckets) >= MAX_IDENTITIES:
                self.buckets = {i: x for i, x in self.buckets.items() if x.held}
            b = self.buckets[identity] = Bucket(self.burst, now)
        mine = b.refill(self.rate, self.burst, now)
        if not (self.everyone.refill(self.global_rate, self.global_burst, now) and mine):
            return False
        b.tokens -= 1
        self.everyone.tokens -= 1
        return True

    # --- the tarpit ---------------------------------------------------------------------------
    def hold(self, identity, env, reply):
        """Keep `reply` until `delay` from now; False (and counted as dropped) when this
        identity, or everyone, has as many held as the bounds allow."""
        b = self.buckets[identity]  # made by admit(), and kept while it holds replies
        if b.held >= MAX_HELD_PER_IDENTITY or len(self.held) >= MAX_HELD:
            self.dropped += 1
            return False
        b.held += 1
        self.held_count += 1
        self.held.append((self.clock() + self.delay, identity, env, reply))
        return True

    @property
    def next_due(self):
        return self.held[0][0] if self.held else None

    def due(self):
        out = []
        if self.held:
            now = self.clock()
            while self.held and self.held[0][0] <= now:
                out.append(self._release())
        return out

    def flush(self):
        return [self._release() for _ in range(len(self.held))]

    def _release(self):
        _, identity, env, reply = self.held.popleft()
        b = self.buckets.get(identity)
        if b is not None:
            b.held -= 1
        return env, reply

    def counts(self):
        return {
            "refused": self.refused,
            "early": self.early_count,
            "held": self.held_count,
            "dropped": self.dropped,
            "waiting": len(self.held),
        }


class Budgets:
    """Token buckets by identity, `rate` a second in bursts of `burst` each; at most
    MAX_IDENTITIES of them kept (the others start afresh).  The daemon gives every client one
    for the snapshots it may ask at will: beyond it, a client's `stats` request waits for a pause
    someone else asks for, or the tarpit's delay, whichever comes first -- answered, never more
    pauses."""

    def __init__(self, rate, burst, clock=time.monotonic):
        if not rate >= 0 or not burst >= 0:
            raise ValueError(f"snapshot budget: rate {rate} and burst {burst} must be at least 0")
        self.rate, self.burst, self.clock = rate, burst, clock
        self.buckets = {}  # identity -> Bucket

    def admit(self, identity):
        """Spend one of `identity`'s tokens: False when it has none now."""
        now = self.clock()
        b = self.buckets.get(identity)
        if b is None:
            if len(self.buckets) >= MAX_IDENTITIES:
                self.buckets.clear()
            b = self.buckets[identity] = Bucket(self.burst, now)
        if not b.refill(self.rate, self.burst, now):
            return False
        b.tokens -= 1
        return True


__all__ = ["Intake", "Budgets", "REFUSALS"]
