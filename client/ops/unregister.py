"""unregister: a worker gives its P slot back.

Sent by a worker's control thread on close, after the worker flushed its cache.  Only the
DEALER that registered the slot may give it back: the daemon compares the routing identity.

Request::

    {"v": 1, "id": 9, "op": "unregister", "slot": 3}

Reply::

    {"v": 1, "id": 9, "ok": true}
"""

from client.ops.schema import Field, Reply
from shm.layout import MAX_SLOTS

REQUEST: dict[str, Field] = {
    "slot": Field(int, True, (0, MAX_SLOTS - 1), "The P slot that `register` gave this worker."),
}
REPLY: dict[str, Reply] = {}
