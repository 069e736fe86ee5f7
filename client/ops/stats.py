"""stats: a memory-statistics snapshot that is exactly consistent.

The daemon stops every live P -- from its own side for a P that is not inside an allocator call
(its stop byte and a membarrier, shm/world.py), by waiting for the call to end for one that is,
through a STOP message to the control thread where membarrier is missing -- FIRST flushes every
cache into the central lists (golang/go#38712: local lists, large spans, buffered cross-process
frees), overlapping the wait for the last Ps, then reads every figure from the quiet arena; with
`slow` it also recomputes them by walking every span and compares.  A P that does not stop within
`deadline_ms` never makes the call hang: the snapshot comes back with `consistent` false and the
late slots in `unflushed` -- never a silently inconsistent one; nor does a lock the daemon cannot
take in time (`stuck_locks`).

Request::

    {"v": 1, "id": 3, "op": "stats", "deadline_ms": 2000, "slow": false}

Reply::

    {"v": 1, "id": 3, "ok": true, "snapshot": {"sys": 1048576, "heap_alloc": 4096, "consistent": true, "epoch": 42, "per_p": [], "unflushed": []}}

Requests that wait together share one pause (and one reply snapshot, the same `epoch`), and two
pauses for requests are at least the daemon's --min-stop-interval-ms apart: a client asking
faster gets its reply later, not more pauses.  A client (a socket, by its routing identity) that
asks more often than the daemon's --snapshot-budget (20 a second, bursts of 40) has its further
requests wait for a pause someone else asks for, or --tarpit-ms (250) at most.

`snapshot` carries every key of the table "The snapshot map" below (the daemon's reply is refused
as INTERNAL when one is missing).
"""

from client.ops.schema import Field, Reply
from shm.stats import FIELDS, META_FIELDS

REQUEST: dict[str, Field] = {
    "deadline_ms": Field(
        int,
        False,
        (1, 10000),
        "How long to wait for every P to park (milliseconds); the daemon caps it at its --park-deadline-ms.",
        2000,
    ),
    "slow": Field(
        bool, False, None, "Also recompute every figure by walking every span, and compare.", False
    ),
}
REPLY: dict[str, Reply] = {
    "snapshot": Reply(dict, "The snapshot map (below)."),
}

# The snapshot map: (key, unit, meaning).  The figures and the snapshot's own keys are declared
# once, in shm/stats.py; these are the keys the daemon adds.
EXTRA_KEYS = (
    ("by_size", "list", 'One map {"size", "mallocs", "frees"} per small size class, in class order.'),
    ("per_p", "list", "One map per live P: its slot and what the daemon knows of it."),
    (
        "unflushed",
        "list",
        "Slots (int) of live Ps that did not park before the deadline, or whose flush (or, for a "
        "dead P, reclaim) could not take its locks in time; empty when consistent.",
    ),
    (
        "stuck_locks",
        "list",
        'One map {"lock", "holder_pid", "stranded"} per arena lock the daemon could not take within '
        "its bound during the pause, or found stranded (its named holder dead, the lock kept by a "
        "process forked without Python's at-fork hooks); empty when consistent.",
    ),
    ("taken_ns", "ns", "time.time_ns() when the world resumed."),
    (
        "park_ns",
        "ns",
        "Part of the pause until every live P had parked (or the deadline); the stopped Ps' caches are flushed meanwhile, once no P still awaited is inside a call, so this includes the flushes.",
    ),
    (
        "flush_ns",
        "ns",
        "Time spent flushing caches, all of it before anything was read (it overlaps the wait for the later Ps).",
    ),
    (
        "ragged_ns",
        "ns",
        "Time of the ragged round before the pause (not part of pause_ns): each P that made an "
        "allocator call since its last flush stopped alone, flushed and resumed while the others "
        "ran; 0 without it (the cooperative protocol, --no-ragged-flush).",
    ),
    ("ragged_flushed", "count", "Ps whose cache the ragged round flushed."),
    (
        "ragged_stop_max_ns",
        "ns",
        "The longest any one P was stopped in the ragged round (its own stop, flush included;"
        " or the flush tried and rolled back, the P left to the pause).",
    ),
    (
        "stop_protocol",
        "str",
        '"membarrier": Ps outside the allocator stopped from the daemon\'s side; "cooperative": '
        "membarrier(2) is unavailable, each P parks itself or through its control thread.",
    ),
)
SLOW_KEYS = (
    ("slow_equal", "bool", "With `slow` only: the fast figures equal the span walk's, field for field."),
    ("slow_diff", "list", "With `slow` only: one str per figure that differs; empty when slow_equal."),
)
SNAPSHOT_KEYS = tuple((name, unit, doc) for name, unit, _kind, doc in FIELDS + META_FIELDS) + EXTRA_KEYS
DOC_TABLES = (("The snapshot map", SNAPSHOT_KEYS + SLOW_KEYS),)
