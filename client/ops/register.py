"""register: a worker's control socket becomes the voice of its P slot.

A worker first asks `ping` for the arena's name, attaches the arena and claims a free P slot
there itself (taking the slot's liveness lock, which the kernel drops if the worker dies).  Then
its control thread sends `register` on its DEALER socket: the daemon checks that `pid` holds the
slot and that `token` is the secret written in the slot at claim (only a process that can
map the arena can read it), and binds the slot to the DEALER's routing identity (the daemon's socket loop passes it to
dispatch) -- that is where this P's STOP messages go -- and says how often to send `heartbeat`.

Request::

    {"v": 1, "id": 1, "op": "register", "pid": 4242, "slot": 3, "token": 9007199254740993}

Reply::

    {"v": 1, "id": 1, "ok": true, "slot": 3, "arena": "shmalloc-1000-4242", "layout_version": 1, "heartbeat_ms": 1000}

Errors: NOT_REGISTERED when `pid` holds no P slot (or, with slot -1, several); FORBIDDEN when
`token` is not the slot's.
"""

from client.ops.schema import UINT64_MAX, Field, Reply
from shm.layout import MAX_SLOTS

REQUEST: dict[str, Field] = {
    "pid": Field(int, True, (1, 2**31 - 1), "The worker's process id (a pid_t: 1 .. 2**31-1)."),
    "slot": Field(
        int, False, (-1, MAX_SLOTS - 1), "The P slot the worker claimed; -1: the one slot `pid` holds.", -1
    ),
    "token": Field(
        int,
        False,
        (0, UINT64_MAX),
        "The secret of the P's slot (its `token` word in the arena, drawn at claim): proves the caller can map the arena; 0: none.",
        0,
    ),
}
REPLY: dict[str, Reply] = {
    "slot": Reply(int, "The P slot now bound to this socket (0-based)."),
    "arena": Reply(str, "Name of the arena's shared-memory segment."),
    "layout_version": Reply(int, "The arena's layout version."),
    "heartbeat_ms": Reply(int, "Send `heartbeat` at least this often (milliseconds)."),
}
