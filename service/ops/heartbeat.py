"""heartbeat: a worker says it is alive.

Sent by a worker's control thread at least every `heartbeat_ms` (from `register`).  A P whose
heartbeats stop, whose pid is gone or whose slot lock is free is reclaimed by the daemon.  Only
the DEALER that registered the slot is accepted.

Request::

    {"v": 1, "id": 12, "op": "heartbeat", "slot": 3}

Reply::

    {"v": 1, "id": 12, "ok": true, "epoch": 41}
"""

from service.ops.schema import Field, Reply
from shm.layout import MAX_SLOTS

REQUEST = {
    "slot": Field(int, True, (0, MAX_SLOTS - 1), "The P slot that `register` gave this worker."),
}
REPLY = {
    "epoch": Reply(int, "The daemon's current snapshot epoch."),
}


def handle(daemon, req):
    return daemon.heartbeat(req["slot"], req["_identity"])
