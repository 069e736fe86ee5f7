"""The daemon's side of the control channel: one handler per op, and dispatch().
See shm/__init__.py for an overview and client/protocol.py for the wire format (the envelope,
the validation, the error codes, and each op's request and reply fields in client/ops/).

    HANDLERS: dict[str, handler]             op name -> handle(daemon, req): calls exactly one
                                             daemon method and returns its result: the reply's
                                             fields as a dict (None for an empty reply; a bare
                                             value for a reply of one field).  req holds the
                                             validated fields, defaults filled in, plus
                                             "_identity": the caller's ZeroMQ routing identity
                                             (bytes), which the daemon's socket loop passes to
                                             dispatch and the wire can never set.
    CHECK_REPLY: dict[str, check]            op name -> check_reply(req, fields), optional further
                                             checks of a reply, raising ProtocolError
    dispatch(daemon, frame, identity=b"")    request frame -> reply frame; never raises
                                             (but KeyboardInterrupt / SystemExit)
    answer(daemon, frame, identity, req, memo)  the same -> (reply frame, error code or None);
                                             `req`: the frame already decoded; `memo`: one
                                             result shared by a batch is packed once
"""

import logging

from client.ops.stats import SLOW_KEYS, SNAPSHOT_KEYS
from client.protocol import (
    OPS,
    _short,
    decode_request,
    encode_error,
    encode_packed_reply,
    error_code,
    pack_reply_fields,
)
from shm.errors import ProtocolError

__all__ = ["HANDLERS", "CHECK_REPLY", "dispatch", "answer"]

log = logging.getLogger("shmalloc.protocol")


def _token(req):
    """The token as a keyword argument, when the request quoted one."""
    return {"token": req["token"]} if req["token"] else {}


def register(daemon, req):
    return daemon.register(
        req["pid"], req["_identity"], None if req["slot"] < 0 else req["slot"], **_token(req)
    )


def unregister(daemon, req):
    return daemon.unregister(req["slot"], req["_identity"], **_token(req))


def heartbeat(daemon, req):
    extra = {"arena_id": req["arena_id"]} if req["arena_id"] else {}
    return daemon.heartbeat(req["slot"], req["_identity"], req["pid"], **_token(req), **extra)


def ping(daemon, req):
    return daemon.ping()


def stats(daemon, req):
    return daemon.snapshot(req["deadline_ms"], req["slow"])


def check(daemon, req):
    return daemon.check(**_token(req))


def release(daemon, req):
    return daemon.release(**_token(req))


def shutdown(daemon, req):
    return daemon.request_shutdown(**_token(req), **({"force": True} if req["force"] else {}))


HANDLERS = {
    "register": register,
    "unregister": unregister,
    "heartbeat": heartbeat,
    "ping": ping,
    "stats": stats,
    "check": check,
    "release": release,
    "shutdown": shutdown,
}


def check_stats_reply(req, reply):
    """Refuse a snapshot without the keys the protocol promises (raised as INTERNAL)."""
    want = SNAPSHOT_KEYS + (SLOW_KEYS if req["slow"] else ())
    missing = [name for name, _unit, _doc in want if name not in reply["snapshot"]]
    if missing:
        raise ProtocolError(f"stats: snapshot lacks {', '.join(missing)}", code="INTERNAL")


CHECK_REPLY = {"stats": check_stats_reply}


def dispatch(daemon, frame, identity=b""):
    """Decode the request in `frame`, call its op's handler with `daemon`, return the reply
    frame.  `identity` (the ROUTER's routing identity of the sender) is passed to the handler as
    req["_identity"].  Every Exception becomes an error reply; unexpected ones (INTERNAL) are
    logged with their traceback on the "shmalloc.protocol" logger.  KeyboardInterrupt and
    SystemExit propagate."""
    return answer(daemon, frame, identity)[0]


def answer(daemon, frame, identity=b"", req=None, memo=None):
    """dispatch(), returning (reply frame, error code) -- the code None for a reply with ok
    true.  `req`, when given, is decode_request(frame), which is then not decoded again.
    `memo`, a dict kept across the requests of one batch: a handler's result that is the very
    object of the previous request's (the batch's shared snapshot) is checked and packed once."""
    try:
        if req is None:
            req = decode_request(frame)
        op = req["op"]
        req["_identity"] = b"" if identity is None else bytes(identity)
        result = HANDLERS[op](daemon, req)
        if memo is not None and memo.get("result") is result:
            fields, packed = memo["fields"], memo["packed"]
        else:
            fields, packed = OPS[op].reply_fields(result), None
        check_reply = CHECK_REPLY.get(op)
        if check_reply is not None:
            check_reply(req, fields)
        if packed is None:
            packed = pack_reply_fields(**fields)
            if memo is not None:
                memo.update(result=result, fields=fields, packed=packed)
        return encode_packed_reply(req["id"], packed), None
    except Exception as exc:
        req_id = req["id"] if req is not None else getattr(exc, "req_id", None)
        code = error_code(exc)
        if code == "INTERNAL":
            log.error("request %s failed", _short(req_id), exc_info=exc)
        return encode_error(req_id, exc), code
