"""The control channel's wire protocol: one envelope, one validation, one mapping from exceptions
to error codes, one registry of ops.  See shm/__init__.py for an overview.

No sockets here, and nothing that runs only in the daemon.  The daemon's ROUTER loop hands every
request frame to service.handlers.dispatch(), which reads it with decode_request(), calls the op's
handler and answers with encode_reply() or encode_error(); clients build frames with
encode_request() and read them with decode_reply().  docs/PROTOCOL.md is generated from this
module and client/ops/ by tools/mkprotocol.py; tests/test_protocol.py checks the checked-in file
equals the generated text.

    VERSION, MAX_FRAME                       the envelope's version; the largest request frame
    OPS: dict[str, OpSpec]                   every op, from the modules of client/ops/
    decode_request(frame) -> dict            daemon side: the validated request, defaults filled in
    encode_reply(req_id, /, **fields)        {"v": 1, "id": ..., "ok": True, **fields}
    pack_reply_fields(**fields)              the fields checked and packed once, for
    encode_packed_reply(req_id, packed)      ... many replies of one result, by id
    encode_error(req_id, exc)                {"v": 1, "id": ..., "ok": False, "error": ..., "message": ...}
    error_code(exc), error_message(exc)      the one mapping of exceptions to the wire
    encode_stop(epoch)                       daemon -> worker: park for snapshot `epoch`
    encode_request(op, req_id, /, **args)    client side: a validated request frame
    decode_reply(frame, op=None) -> dict     client side: a reply (ok True) or a stop message; an
                                             error reply raises shm.errors.RemoteError

Every ProtocolError raised while reading a frame carries `req_id`: the request's id when it could
be read, else None -- dispatch echoes it in the error reply.
"""

import inspect
from typing import NamedTuple

import msgpack

from client import ops
from client.ops.schema import INT64_MIN, TYPE_NAMES, UINT64_MAX, Field, Reply
from shm.errors import ProtocolError, RemoteError, ShmallocError

__all__ = [
    "VERSION",
    "MAX_FRAME",
    "OPS",
    "OpSpec",
    "Field",
    "Reply",
    "decode_request",
    "encode_reply",
    "pack_reply_fields",
    "encode_packed_reply",
    "encode_error",
    "error_code",
    "error_message",
    "encode_stop",
    "encode_request",
    "decode_reply",
    "CODES",
    "STOP",
]

VERSION = 1
MAX_FRAME = 64 * 1024  # bytes: a larger request frame is refused (TOO_LARGE) unread
MAX_REPLY = 16 * 1024 * 1024  # bytes: the largest reply a client unpacks
MAX_ID_LEN = 64  # characters of a str id
MAX_MESSAGE = 1024  # characters of an error message
MAX_DEPTH = 32  # nesting of containers in a reply
ENVELOPE = ("v", "id", "op")  # request keys that are not the op's fields
REPLY_ENVELOPE = ("v", "id", "ok", "error", "message")

# Bounds passed to msgpack, so that a small frame cannot declare a huge container.
_REQUEST_LIMITS = dict(
    max_str_len=4096, max_bin_len=4096, max_ext_len=4096, max_array_len=1024, max_map_len=64
)
_REPLY_LIMITS = dict(
    max_str_len=MAX_REPLY,
    max_bin_len=MAX_REPLY,
    max_ext_len=MAX_REPLY,
    max_array_len=1 << 20,
    max_map_len=1 << 16,
)

# Wire codes of the protocol layer itself, each raised as ProtocolError(message, code=...).  The
# codes of the error tree (shm/errors.py) are documented from their exception docstrings.
CODES = {
    "BAD_FRAME": "The frame is not exactly one msgpack object: empty, truncated, not msgpack, "
    "trailing bytes, invalid UTF-8, a map key that is not a str, or a string, array "
    "or map over the limits.",
    "TOO_LARGE": f"The request frame is over {MAX_FRAME} bytes; refused without unpacking it.",
    "BAD_REQUEST": "The request is not a map, or its id or op is missing or of the wrong type.",
    "BAD_VERSION": f'The envelope\'s "v" is missing or is not the int {VERSION}.',
    "UNKNOWN_OP": 'The "op" names no op of this document (the daemon-to-worker "stop" included).',
    "BAD_ARGS": "The op's fields: a required one missing, an unknown one, a wrong type (a bool is "
    "not an int, an int is not a float), or a value out of bounds.",
    "BAD_REPLY": "Client side only: the daemon's reply or stop message breaks this document.",
    "INTERNAL": "The daemon failed on an unexpected exception (the message starts with its type "
    "name), or its handler returned a reply that breaks the op's reply fields.",
}

# The one unsolicited message: daemon -> worker, on the worker's DEALER.
STOP = {
    "epoch": Field(
        int,
        True,
        (1, 2**63 - 1),
        "The snapshot's epoch; the worker writes its PARKED acknowledgement for this epoch into its P slot.",
    ),
}
STOP_DOC = """\
The daemon sends it, unsolicited and without an id, to the DEALER of every live P when a snapshot
begins (the snapshot protocol in shm/__init__.py).  The worker's control thread takes the P's in-process lock, writes
back its private fast-path state and acknowledges in shared memory (its P slot), not on the
socket; it resumes when the daemon clears the stop request in its P slot (no message on the
socket either).  decode_reply() returns it as {"v": 1, "op": "stop", "epoch": ...}, so a worker's
receive loop tells it from a reply by its "op" key.

    {"v": 1, "op": "stop", "epoch": 42}
"""

ENVELOPE_DOC = f"""\
Every message is one ZeroMQ frame holding one msgpack map with str keys (the daemon's ROUTER
adds and strips the routing identity frame).  The daemon is a ROUTER; each worker talks through
one DEALER owned by its control thread; observers use a DEALER or REQ of their own.

    request  client -> daemon   {{"v": {VERSION}, "id": ID, "op": OP, ...the op's request fields}}
    reply    daemon -> client   {{"v": {VERSION}, "id": ID, "ok": true, ...the op's reply fields}}
    error    daemon -> client   {{"v": {VERSION}, "id": ID or nil, "ok": false, "error": CODE, "message": str}}
    stop     daemon -> worker   {{"v": {VERSION}, "op": "stop", "epoch": int}}

- `v` is the int {VERSION}; anything else is refused with BAD_VERSION.
- `id` is chosen by the client: an int (64-bit) or a str of at most {MAX_ID_LEN} characters.  The
  reply echoes it.  A DEALER can receive the late reply to an earlier request it gave up on: match
  replies to requests by id and drop the others.  An error reply's id is nil when the request's
  id could not be read.
- `op` names one of the ops below; the op's request fields sit beside `v`, `id` and `op`.  Types
  are exact (a bool is not an int, an int is not a float), ints stay within their bounds, unknown
  fields are refused (BAD_ARGS), absent optional fields take their defaults.
- A request frame over {MAX_FRAME} bytes is refused with TOO_LARGE without being unpacked.  Inside
  a request, strings and binaries are limited to {_REQUEST_LIMITS["max_str_len"]} bytes, arrays to {_REQUEST_LIMITS["max_array_len"]}
  elements and maps to {_REQUEST_LIMITS["max_map_len"]} keys (BAD_FRAME).
- Every request frame gets exactly one reply.  The daemon never dies of a request: every failure,
  expected or not, becomes an error reply.  Error messages are at most {MAX_MESSAGE} characters.
- A refusal (a protocol error, FORBIDDEN, NOT_REGISTERED) beyond the daemon's refusal budgets --
  per client, by routing identity, and for every client together -- is answered late, the same
  reply after --tarpit-ms; one beyond the bound of refusals held is not answered at all.
  Requests that succeed are never held.
"""


# ----------------------------------------------------------------------------- the registry


class OpSpec(NamedTuple):
    """One op, as declared by its module in client/ops/.  Its handler is the daemon's
    (service/handlers.py)."""

    name: str  # the wire name: the module's name
    request: dict  # field -> Field(type, required, bounds, doc, default)
    reply: dict  # field -> Reply(type, doc)
    doc: str  # the module's docstring: the op's spec
    doc_tables: tuple = ()  # ((title, ((key, unit, meaning), ...)), ...) for the docs

    @classmethod
    def from_module(cls, module):
        name = module.__name__.rpartition(".")[2]
        doc = inspect.getdoc(module)
        if not doc or not doc.startswith(name + ":"):
            raise TypeError(f"op module {module.__name__}: the docstring must start with '{name}:'")
        for field, f in module.REQUEST.items():
            if field in ENVELOPE or field.startswith("_") or f.type not in (int, bool, float, str):
                raise TypeError(f"op {name}: bad request field {field!r}")
            if not f.required:
                _check_fields(f"op {name} default", {field: f.default}, {field: f}, "BAD_ARGS")
        for field, r in module.REPLY.items():
            if field in REPLY_ENVELOPE + ("op",) or r.type not in (int, bool, float, str, dict, list):
                raise TypeError(f"op {name}: bad reply field {field!r}")
        return cls(
            name, dict(module.REQUEST), dict(module.REPLY), doc, tuple(getattr(module, "DOC_TABLES", ()))
        )

    def reply_fields(self, result):
        """The handler's result as the reply's fields, checked against REPLY (INTERNAL if not).
        A handler returns the fields as a dict; None (or anything not a dict) for an op whose
        reply is empty; or the bare value of a reply of one field."""
        if len(self.reply) == 1 and not (isinstance(result, dict) and result.keys() == self.reply.keys()):
            result = {next(iter(self.reply)): result}
        elif not self.reply and not isinstance(result, dict):
            result = {}
        if not isinstance(result, dict):
            raise _fail(
                f"op {self.name}: the handler returned {_type_name(result)}, not the map "
                f"{{{', '.join(self.reply)}}}",
                "INTERNAL",
            )
        return _check_reply_fields(f"op {self.name} reply", result, self.reply, "INTERNAL")


# ----------------------------------------------------------------------------- validation


def _fail(message, code, req_id=None):
    exc = ProtocolError(message, code=code)
    exc.req_id = req_id
    return exc


def _type_name(x):
    return TYPE_NAMES.get(type(x), type(x).__name__)


def _short(x, limit=40):
    """A bounded description of a value from the wire, for messages (never recursive)."""
    if isinstance(x, (list, tuple, dict)):
        return f"a {_type_name(x)} of {len(x)}"
    r = repr(x)
    return r if len(r) <= limit else r[:limit] + "..."


def _valid_id(x):
    return (type(x) is int and INT64_MIN <= x <= UINT64_MAX) or (type(x) is str and len(x) <= MAX_ID_LEN)


def _unpack(frame, limit, limits):
    try:
        size = memoryview(frame).nbytes
    except Exception:
        raise _fail(f"a frame is bytes, not {type(frame).__name__}", "BAD_FRAME") from None
    if size > limit:
        raise _fail(f"frame of {size} bytes is over the limit of {limit}", "TOO_LARGE")
    if size == 0:
        raise _fail("empty frame", "BAD_FRAME")
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=True, **limits)
    except Exception as exc:  # ExtraData, FormatError, StackError, ValueError, UnicodeDecodeError, ...
        raise _fail(
            f"not one msgpack object: {type(exc).__name__}: {_clean(str(exc), 200)}", "BAD_FRAME"
        ) from None


def _reject_unknown(where, values, schema, code):
    unknown = [k for k in values if k not in schema]
    if unknown:
        raise _fail(f"{where}: unknown field(s) {', '.join(sorted(map(_short, unknown)))}", code)


def _check_fields(where, values, schema, code):
    """values checked against a request schema {name: Field}; returns them, defaults filled in."""
    _reject_unknown(where, values, schema, code)
    out = {}
    for name, f in schema.items():
        if name not in values:
            if f.required:
                raise _fail(f"{where}: missing field {name!r}", code)
            out[name] = f.default
            continue
        value = values[name]
        if type(value) is not f.type:
            raise _fail(f"{where}: {name} must be {TYPE_NAMES[f.type]}, got {_type_name(value)}", code)
        if f.bounds is not None:
            lo, hi = f.bounds
            if not lo <= (len(value) if f.type is str else value) <= hi:
                raise _fail(f"{where}: {name} = {_short(value)} is outside {lo}..{hi}", code)
        out[name] = value
    return out


def _check_reply_fields(where, values, schema, code):
    """values checked against a reply schema {name: Reply}; an int for a float field becomes a float."""
    _reject_unknown(where, values, schema, code)
    out = {}
    for name, r in schema.items():
        if name not in values:
            raise _fail(f"{where}: missing field {name!r}", code)
        value = values[name]
        if r.type is float and type(value) is int:
            value = float(value)
        good = {
            int: type(value) is int,
            bool: type(value) is bool,
            float: isinstance(value, float),
            str: isinstance(value, str),
            dict: isinstance(value, dict),
            list: isinstance(value, (list, tuple)),
        }[r.type]
        if not good:
            raise _fail(f"{where}: {name} must be {TYPE_NAMES[r.type]}, got {_type_name(value)}", code)
        out[name] = value
    return out


def _check_wire(value, where, depth=0):
    """Refuse (INTERNAL) what msgpack cannot carry or a client could not unpack: non-str map
    keys, ints beyond 64 bits, other types, nesting deeper than MAX_DEPTH."""
    if value is None or isinstance(value, (bool, float, str, bytes, bytearray)):
        return
    if isinstance(value, int):
        if not INT64_MIN <= value <= UINT64_MAX:
            raise _fail(f"{where}: int {value} does not fit in 64 bits", "INTERNAL")
        return
    if depth >= MAX_DEPTH:
        raise _fail(f"{where}: nested deeper than {MAX_DEPTH}", "INTERNAL")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_wire(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _fail(f"{where}: map key {_short(key)} is not a str", "INTERNAL")
            _check_wire(item, f"{where}.{key}", depth + 1)
    else:
        raise _fail(f"{where}: a {type(value).__name__} cannot go on the wire", "INTERNAL")


def _clean(text, limit):
    """At most `limit` characters that are sure to encode as UTF-8 (no lone surrogates)."""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# Every op, by wire name, in the order of client/ops/MODULES.
OPS = {spec.name: spec for spec in map(OpSpec.from_module, ops.MODULES)}


# ----------------------------------------------------------------------------- daemon side


def decode_request(frame):
    """The request in `frame`, validated: {"v", "id", "op", **the op's fields, defaults filled in}.
    Raises ProtocolError (code BAD_FRAME, TOO_LARGE, BAD_REQUEST, BAD_VERSION, UNKNOWN_OP or
    BAD_ARGS, attribute req_id) and nothing else, whatever the frame holds."""
    msg = _unpack(frame, MAX_FRAME, _REQUEST_LIMITS)
    if not isinstance(msg, dict):
        raise _fail(f"a request is a map, not {_type_name(msg)}", "BAD_REQUEST")
    req_id = msg.get("id")
    try:
        return _check_request(msg)
    except ProtocolError as exc:
        exc.req_id = req_id if _valid_id(req_id) else None
        raise


def _check_request(msg):
    if "v" not in msg:
        raise _fail('missing "v"', "BAD_VERSION")
    if type(msg["v"]) is not int or msg["v"] != VERSION:
        raise _fail(f'"v" is {_short(msg["v"])}; this daemon speaks {VERSION}', "BAD_VERSION")
    if "id" not in msg:
        raise _fail('missing "id"', "BAD_REQUEST")
    if not _valid_id(msg["id"]):
        raise _fail(
            f'"id" must be a 64-bit int or a str of at most {MAX_ID_LEN} characters, got '
            f"{_type_name(msg['id'])} {_short(msg['id'], 20)}",
            "BAD_REQUEST",
        )
    if "op" not in msg:
        raise _fail('missing "op"', "BAD_REQUEST")
    op = msg["op"]
    if type(op) is not str:
        raise _fail(f'"op" must be str, got {_type_name(op)}', "BAD_REQUEST")
    spec = OPS.get(op)
    if spec is None:
        raise _fail(f"unknown op {_short(op)}; ops: {', '.join(OPS)}", "UNKNOWN_OP")
    args = {k: v for k, v in msg.items() if k not in ENVELOPE}
    return {
        "v": VERSION,
        "id": msg["id"],
        "op": op,
        **_check_fields(f"op {op}", args, spec.request, "BAD_ARGS"),
    }


def encode_reply(req_id, /, **fields):
    """{"v": 1, "id": req_id, "ok": True, **fields}.  ProtocolError (INTERNAL) when a field clashes
    with the envelope or cannot go on the wire (see _check_wire)."""
    if not _valid_id(req_id):
        raise _fail(f"bad reply: id {_short(req_id)}", "INTERNAL")
    return encode_packed_reply(req_id, pack_reply_fields(**fields))


def pack_reply_fields(**fields):
    """A reply's fields, checked as encode_reply checks them and packed once, for
    encode_packed_reply: many replies of one result (the requests one pause answers) differ only
    in their id.  Returns (number of fields, their packed keys and values)."""
    clash = [k for k in fields if k in REPLY_ENVELOPE]
    if clash:
        raise _fail(f"bad reply: envelope fields {clash}", "INTERNAL")
    _check_wire(fields, "reply")
    return len(fields), b"".join(msgpack.packb(x, use_bin_type=True) for kv in fields.items() for x in kv)


def encode_packed_reply(req_id, packed):
    """The bytes encode_reply(req_id, **fields) makes, from packed = pack_reply_fields(**fields):
    the envelope's map grown by the packed fields (a msgpack map is its size, then its keys and
    values in order)."""
    if not _valid_id(req_id):
        raise _fail(f"bad reply: id {_short(req_id)}", "INTERNAL")
    n, body = packed
    head = msgpack.packb({"v": VERSION, "id": req_id, "ok": True}, use_bin_type=True)  # a fixmap of 3
    size = 3 + n
    prefix = bytes([0x80 | size]) if size < 16 else b"\xde" + size.to_bytes(2, "big")
    return prefix + head[1:] + body


def encode_error(req_id, exc):
    """{"v": 1, "id": req_id, "ok": False, "error": error_code(exc), "message": error_message(exc)};
    the id becomes None when it is not a valid id.  Never raises."""
    return msgpack.packb(
        {
            "v": VERSION,
            "id": req_id if _valid_id(req_id) else None,
            "ok": False,
            "error": error_code(exc),
            "message": error_message(exc),
        },
        use_bin_type=True,
    )


def error_code(exc):
    """The wire code of any exception: a ShmallocError's `code`, else "INTERNAL"."""
    if isinstance(exc, ShmallocError):
        code = getattr(exc, "code", None)
        if type(code) is str and code:
            return _clean(code, 64)
    return "INTERNAL"


def error_message(exc):
    """The wire message of any exception: str(exc) for a ShmallocError, "Type: str(exc)" for
    anything else; at most MAX_MESSAGE characters; never raises."""
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable message>"
    if not isinstance(exc, ShmallocError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return _clean(text, MAX_MESSAGE)


def encode_stop(epoch):
    """The daemon's unsolicited stop message for snapshot `epoch`: {"v": 1, "op": "stop", "epoch": epoch}."""
    _check_fields("stop", {"epoch": epoch}, STOP, "BAD_ARGS")
    return msgpack.packb({"v": VERSION, "op": "stop", "epoch": epoch}, use_bin_type=True)


# ----------------------------------------------------------------------------- client side


def encode_request(op, req_id, /, **args):
    """A request frame for `op`, validated as the daemon will (ProtocolError UNKNOWN_OP,
    BAD_REQUEST or BAD_ARGS before anything is sent)."""
    spec = OPS.get(op)
    if spec is None:
        raise _fail(f"unknown op {_short(op)}; ops: {', '.join(OPS)}", "UNKNOWN_OP")
    if not _valid_id(req_id):
        raise _fail(f"id must be a 64-bit int or a str of at most {MAX_ID_LEN} characters", "BAD_REQUEST")
    _check_fields(f"op {op}", args, spec.request, "BAD_ARGS")
    return msgpack.packb({"v": VERSION, "id": req_id, "op": op, **args}, use_bin_type=True)


def decode_reply(frame, op=None):
    """A frame from the daemon: a reply {"v", "id", "ok": True, ...} or a stop message
    {"v", "op": "stop", "epoch"} (test `"op" in msg`).  With `op`, the reply's fields are checked
    against that op's reply fields (an int for a float field becomes a float).  An error reply
    raises RemoteError(message, code=its error code), with attribute req_id; a malformed frame
    raises ProtocolError (BAD_FRAME, TOO_LARGE, BAD_VERSION or BAD_REPLY)."""
    msg = _unpack(frame, MAX_REPLY, _REPLY_LIMITS)
    if not isinstance(msg, dict):
        raise _fail(f"a reply is a map, not {_type_name(msg)}", "BAD_REPLY")
    if type(msg.get("v")) is not int or msg["v"] != VERSION:
        raise _fail(f'reply "v" is {_short(msg.get("v"))}; this client speaks {VERSION}', "BAD_VERSION")
    if "op" in msg:
        if msg["op"] != "stop":
            raise _fail(f"the daemon sends no message {_short(msg['op'])}", "BAD_REPLY")
        rest = {k: v for k, v in msg.items() if k not in ("v", "op")}
        return {"v": VERSION, "op": "stop", **_check_fields("stop", rest, STOP, "BAD_REPLY")}
    req_id = msg.get("id", ...)
    if not (req_id is None or _valid_id(req_id)) or type(msg.get("ok")) is not bool:
        raise _fail(
            f"reply without a valid id and ok: id {_short(req_id)}, ok {_short(msg.get('ok'))}", "BAD_REPLY"
        )
    if not msg["ok"]:
        code, message = msg.get("error"), msg.get("message")
        if type(code) is not str or type(message) is not str or len(msg) != len(REPLY_ENVELOPE):
            raise _fail("malformed error reply", "BAD_REPLY", req_id)
        exc = RemoteError(message, code=code)
        exc.req_id = req_id
        raise exc
    if op is None:
        return msg
    spec = OPS.get(op)
    if spec is None:
        raise _fail(f"unknown op {_short(op)}; ops: {', '.join(OPS)}", "UNKNOWN_OP", req_id)
    fields = {k: v for k, v in msg.items() if k not in ("v", "id", "ok")}
    return {
        "v": VERSION,
        "id": req_id,
        "ok": True,
        **_check_reply_fields(f"op {op} reply", fields, spec.reply, "BAD_REPLY"),
    }
