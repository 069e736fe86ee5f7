"""release: give idle heap pages back to the OS now (Go: debug.FreeOSMemory's scavenge).

Free spans are released with madvise(MADV_REMOVE): tmpfs frees their pages, `heap_released`
grows, and a later allocation re-commits them.  Live objects are never touched.

Request::

    {"v": 1, "id": 6, "op": "release"}

Reply::

    {"v": 1, "id": 6, "ok": true, "released_bytes": 262144}
"""

from client.ops.schema import Field, Reply

REQUEST: dict[str, Field] = {}
REPLY: dict[str, Reply] = {
    "released_bytes": Reply(int, "Bytes released to the OS by this request."),
}
