"""The control channel's ops: one module per op, each module's docstring its request/reply spec
(circus's commands).  See shm/__init__.py for an overview and client/protocol.py for the
envelope and the validation; docs/PROTOCOL.md is generated from these modules
(tools/mkprotocol.py).

Each op module declares

    REQUEST   {field: schema.Field(type, required, bounds, doc, default)}  -- the wire arguments
    REPLY     {field: schema.Reply(type, doc)}                             -- the reply's fields
    DOC_TABLES  optional: ((title, ((key, unit, meaning), ...)), ...) for docs/PROTOCOL.md

and nothing that runs in the daemon: each op's handler -- handle(daemon, req), which calls
exactly one daemon method -- and its optional further reply checks live in service/handlers.py,
one entry per op of MODULES.

The op's wire name is the module's name.  A new op is a new module listed in MODULES, and its
handler in service/handlers.py.
"""

from . import check, heartbeat, ping, register, release, shutdown, stats, unregister

MODULES = (register, unregister, heartbeat, ping, stats, check, release, shutdown)
