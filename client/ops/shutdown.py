"""shutdown: ask the daemon to exit cleanly (as SIGTERM does).

The daemon replies first, then stops: one last snapshot, then it removes the socket file.  With
no live worker it removes the arena segment too; with live workers it keeps the arena for them
(their blocks and handles stay valid) and a daemon restarted on the endpoint adopts it.  With
`force` it closes the arena for good instead: every live worker's next call raises ArenaClosed
(CLOSED), and the segment is removed.

Administrative: served over an ipc:// endpoint (the socket file's mode decides who may connect)
or a CURVE-authenticated tcp:// one; over plain tcp:// only with `token`, the secret of a live P
slot (FORBIDDEN otherwise).

Request::

    {"v": 1, "id": 7, "op": "shutdown", "token": 0, "force": false}

Reply::

    {"v": 1, "id": 7, "ok": true}
"""

from client.ops.schema import UINT64_MAX, Field, Reply

REQUEST: dict[str, Field] = {
    "token": Field(
        int, False, (0, UINT64_MAX), "The secret of a live P slot: needed over plain tcp:// only.", 0
    ),
    "force": Field(
        bool,
        False,
        None,
        "Close the arena for good even if live workers hold Ps (their next call raises ArenaClosed); false: keep it for them.",
        False,
    ),
}
REPLY: dict[str, Reply] = {}
