"""shutdown: ask the daemon to exit cleanly (as SIGTERM does).

The daemon replies first, then stops: it removes the arena segment and the socket file.

Administrative: served over an ipc:// endpoint (the socket file's mode decides who may connect)
or a CURVE-authenticated tcp:// one; over plain tcp:// only with `token`, the secret of a live P
slot (FORBIDDEN otherwise).

Request::

    {"v": 1, "id": 7, "op": "shutdown", "token": 0}

Reply::

    {"v": 1, "id": 7, "ok": true}
"""

from client.ops.schema import UINT64_MAX, Field, Reply

REQUEST: dict[str, Field] = {
    "token": Field(
        int, False, (0, UINT64_MAX), "The secret of a live P slot: needed over plain tcp:// only.", 0
    ),
}
REPLY: dict[str, Reply] = {}
