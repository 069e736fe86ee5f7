"""release: give idle heap pages back to the OS now (Go: debug.FreeOSMemory's scavenge).

Free spans are released with madvise(MADV_REMOVE): tmpfs frees their pages, `heap_released`
grows, and a later allocation re-commits them.  Live objects are never touched.

Administrative: served over an ipc:// endpoint (the socket file's mode decides who may connect)
or a CURVE-authenticated tcp:// one; over plain tcp:// only with `token`, the secret of a live P
slot (FORBIDDEN otherwise).

Request::

    {"v": 1, "id": 6, "op": "release", "token": 0}

Reply::

    {"v": 1, "id": 6, "ok": true, "released_bytes": 262144}
"""

from client.ops.schema import UINT64_MAX, Field, Reply

REQUEST: dict[str, Field] = {
    "token": Field(
        int, False, (0, UINT64_MAX), "The secret of a live P slot: needed over plain tcp:// only.", 0
    ),
}
REPLY: dict[str, Reply] = {
    "released_bytes": Reply(int, "Bytes released to the OS by this request."),
}
