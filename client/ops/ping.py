"""ping: is the daemon there, and what is it serving?

Anyone may send it (a worker, an observer, a health check); it touches no P.

Request::

    {"v": 1, "id": "p-1", "op": "ping"}

Reply::

    {"v": 1, "id": "p-1", "ok": true, "pid": 1000, "uptime_s": 12.5, "epoch": 41, "num_p": 4, "arena": "shmalloc-1000-4242", "version": "0.1.0"}
"""

from client.ops.schema import Field, Reply

REQUEST: dict[str, Field] = {}
REPLY: dict[str, Reply] = {
    "pid": Reply(int, "The daemon's process id; 0 over plain tcp:// (pids go to trusted peers only)."),
    "uptime_s": Reply(float, "Seconds since the daemon started."),
    "epoch": Reply(int, "The last snapshot's epoch (0 before the first)."),
    "num_p": Reply(int, "Live Ps (registered workers)."),
    "arena": Reply(str, "Name of the arena's shared-memory segment."),
    "version": Reply(str, "shmalloc version of the daemon."),
}
