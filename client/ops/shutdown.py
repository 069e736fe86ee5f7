"""shutdown: ask the daemon to exit cleanly (as SIGTERM does).

The daemon replies first, then stops: it removes the arena segment and the socket file.

Request::

    {"v": 1, "id": 7, "op": "shutdown"}

Reply::

    {"v": 1, "id": 7, "ok": true}
"""

from client.ops.schema import Field, Reply

REQUEST: dict[str, Field] = {}
REPLY: dict[str, Reply] = {}
