"""The control channel's ops: one module per op, each module's docstring its request/reply spec
(circus's commands).  See shm/__init__.py for an overview and service/protocol.py for the
envelope, the validation and the dispatch; docs/PROTOCOL.md is generated from these modules.

Each op module declares

    REQUEST   {field: schema.Field(type, required, bounds, doc, default)}  -- the wire arguments
    REPLY     {field: schema.Reply(type, doc)}                             -- the reply's fields
    handle(daemon, req)   calls exactly one daemon method and returns its result: the reply's
                          fields as a dict (None for an empty reply; a bare value for a reply of
                          one field).  req holds the validated fields, defaults filled in, plus
                          "_identity": the caller's ZeroMQ routing identity (bytes), which the
                          daemon's socket loop passes to dispatch and the wire can never set.
    check_reply(req, reply)   optional: further checks of the reply, raising ProtocolError.

The op's wire name is the module's name.  A new op is a new module listed in MODULES.
"""

from . import check, heartbeat, ping, register, release, shutdown, stats, unregister

MODULES = (register, unregister, heartbeat, ping, stats, check, release, shutdown)
