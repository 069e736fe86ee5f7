"""heartbeat: a worker says it is alive.

Sent by a worker's control thread at least every `heartbeat_ms` (from `register`).  The daemon
reclaims a P whose process died (its slot lock freed by the kernel, or its pid gone); the
heartbeat is how a worker that outlived a daemon re-binds its socket to its slot with the
daemon that adopted the arena: the slot must be held by `pid`, and `token` must be the slot's
secret (see `register`) -- a heartbeat that would move a slot to another socket without it is
refused with FORBIDDEN.  `arena_id` names the arena the worker's P is in: a daemon that serves
another arena (the worker's daemon is gone and its arena with it) refuses with
FOREIGN_REFERENCE, and the worker's next call raises ArenaClosed.

Request::

    {"v": 1, "id": 12, "op": "heartbeat", "slot": 3, "pid": 4242, "token": 9007199254740993,
     "arena_id": 12345678901234567890}

Reply::

    {"v": 1, "id": 12, "ok": true, "epoch": 41}
"""

from client.ops.schema import UINT64_MAX, Field, Reply
from shm.layout import MAX_SLOTS

REQUEST: dict[str, Field] = {
    "slot": Field(int, True, (0, MAX_SLOTS - 1), "The P slot that `register` gave this worker."),
    "pid": Field(int, False, (0, 2**31 - 1), "The worker's pid; 0: not checked.", 0),
    "token": Field(
        int,
        False,
        (0, UINT64_MAX),
        "The secret of the P's slot (its `token` word in the arena, drawn at claim): proves the caller can map the arena; 0: none.",
        0,
    ),
    "arena_id": Field(
        int,
        False,
        (0, UINT64_MAX),
        "The identity of the arena the P is in (its header's `arena_id`); 0: not checked.",
        0,
    ),
}
REPLY: dict[str, Reply] = {
    "epoch": Reply(int, "The daemon's current snapshot epoch."),
}
