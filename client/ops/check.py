"""check: walk every span and check every invariant (`shmalloc check`).

The daemon parks every P, flushes every cache, then runs the full checks: the structural
invariants of the arena and the identities every consistent snapshot satisfies (those of
`stats`) on a snapshot recomputed from the ground truth (span table, page map, allocation map).  An empty `problems` list means the
arena is sound; `shmalloc check` exits 1 otherwise.

Administrative: served over an ipc:// endpoint (the socket file's mode decides who may connect)
or a CURVE-authenticated tcp:// one; over plain tcp:// only with `token`, the secret of a live P
slot (FORBIDDEN otherwise).

Request::

    {"v": 1, "id": 5, "op": "check", "token": 0}

Reply::

    {"v": 1, "id": 5, "ok": true, "problems": [], "snapshot": {"sys": 1048576, "consistent": true}}
"""

from client.ops.schema import UINT64_MAX, Field, Reply

REQUEST: dict[str, Field] = {
    "token": Field(
        int, False, (0, UINT64_MAX), "The secret of a live P slot: needed over plain tcp:// only.", 0
    ),
}
REPLY: dict[str, Reply] = {
    "problems": Reply(list, "One str per broken invariant or identity, naming it; empty when sound."),
    "snapshot": Reply(dict, "The figures the checks ran on (keys as in `stats`)."),
}
