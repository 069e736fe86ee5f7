"""unregister: a worker gives its P slot back.

Sent by a worker's control thread on close, after the worker flushed its cache.  Only the
DEALER that registered the slot may give it back, quoting the slot's `token`: the daemon
compares the routing identity and the token (FORBIDDEN otherwise).

Request::

    {"v": 1, "id": 9, "op": "unregister", "slot": 3, "token": 9007199254740993}

Reply::

    {"v": 1, "id": 9, "ok": true}
"""

from client.ops.schema import UINT64_MAX, Field, Reply
from shm.layout import MAX_SLOTS

REQUEST: dict[str, Field] = {
    "slot": Field(int, True, (0, MAX_SLOTS - 1), "The P slot that `register` gave this worker."),
    "token": Field(
        int,
        False,
        (0, UINT64_MAX),
        "The secret of the P's slot (its `token` word in the arena, drawn at claim): proves the caller can map the arena; 0: none.",
        0,
    ),
}
REPLY: dict[str, Reply] = {}
