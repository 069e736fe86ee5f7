"""The control-channel protocol (client/protocol.py, client/ops/, service/handlers.py and
tools/mkprotocol.py), without sockets: round trips
of every op against a fake daemon, every refusal code, the exception mapping, the stop message,
the registry and the generated docs/PROTOCOL.md.  See shm/__init__.py for an overview."""

import importlib.util
import json
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import client.ops
from client import protocol as P
from client.ops import stats as stats_op
from client.ops.schema import INT64_MIN, UINT64_MAX, Field, Reply
from service.handlers import CHECK_REPLY, HANDLERS, dispatch
from shm import errors as E
from shm.layout import MAX_SLOTS

ROOT = Path(__file__).resolve().parents[1]


def _load_generator():
    spec = importlib.util.spec_from_file_location("mkprotocol", ROOT / "tools" / "mkprotocol.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MK = _load_generator()
DOCUMENTED_CODES = {cls.code for cls, _ in MK._error_tree()} | set(P.CODES)


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack(frame, _unpackb=msgpack.unpackb):  # bound now: a test patches msgpack.unpackb
    return _unpackb(frame, raw=False)


def _value(unit):
    return {"list": [], "bool": True}.get(unit, 0)


SNAPSHOT = {name: _value(unit) for name, unit, _doc in stats_op.SNAPSHOT_KEYS}
SNAPSHOT.update(
    sys=1 << 20,
    by_size=[{"size": 8, "mallocs": 3, "frees": 1}],
    per_p=[{"slot": 0, "pid": 99}],
    unflushed=[],
    epoch=7,
)
SLOW_SNAPSHOT = dict(SNAPSHOT, slow_equal=True, slow_diff=[])
REGISTER = {"slot": 3, "arena": "shmalloc-test", "layout_version": 1, "heartbeat_ms": 1000}
PING = {"pid": 1234, "uptime_s": 1.5, "epoch": 7, "num_p": 2, "arena": "shmalloc-test", "version": "0.1.0"}
CHECK = {"problems": ["span 3: count 2 != bitmap 1"], "snapshot": SNAPSHOT}


class FakeDaemon:
    """The daemon's methods, recording every call; each returns returns[method], or raises it
    when it is an exception."""

    def __init__(self, **returns):
        self.calls = []
        self.returns = dict(
            register=REGISTER,
            unregister=None,
            heartbeat={"epoch": 7},
            ping=PING,
            snapshot=SNAPSHOT,
            check=CHECK,
            release={"released_bytes": 8192},
            request_shutdown=None,
        )
        self.returns.update(returns)

    def _call(self, name, *args):
        self.calls.append((name, args))
        result = self.returns[name]
        if isinstance(result, BaseException):
            raise result
        return result

    def register(self, pid, identity, slot=None, token=0):
        return self._call("register", pid, identity, *(() if slot is None else (slot,)), *_t(token))

    def unregister(self, slot, identity, token=0):
        return self._call("unregister", slot, identity, *_t(token))

    def heartbeat(self, slot, identity, pid=0, token=0, arena_id=0):
        aid = (("arena_id", arena_id),) if arena_id else ()
        return self._call("heartbeat", slot, identity, *((pid,) if pid else ()), *_t(token), *aid)

    def ping(self):
        return self._call("ping")

    def snapshot(self, deadline_ms, slow):
        return self._call("snapshot", deadline_ms, slow)

    def check(self, token=0):
        return self._call("check", *_t(token))

    def release(self, token=0):
        return self._call("release", *_t(token))

    def request_shutdown(self, token=0, force=False):
        return self._call("request_shutdown", *_t(token), *((("force", True),) if force else ()))


def _t(token):
    """A token the request quoted, as the fake daemon records it: ("token", value)."""
    return (("token", token),) if token else ()


def error_of(frame):
    """(code, id, message) of an error reply frame, checking its envelope."""
    msg = unpack(frame)
    assert set(msg) == {"v", "id", "ok", "error", "message"}, msg
    assert msg["v"] == 1 and msg["ok"] is False and isinstance(msg["message"], str)
    return msg["error"], msg["id"], msg["message"]


# ----------------------------------------------------------------------------- round trips

# (op, args, identity, daemon returns, the daemon call expected, the reply's fields expected)
ROUND_TRIPS = [
    ("register", {"pid": 4242}, b"peer-1", {}, ("register", (4242, b"peer-1")), REGISTER),
    ("register", {"pid": 2**31 - 1}, b"", {}, ("register", (2**31 - 1, b"")), REGISTER),
    ("register", {"pid": 7, "slot": 3}, b"p", {}, ("register", (7, b"p", 3)), REGISTER),
    ("unregister", {"slot": 3}, b"peer-1", {}, ("unregister", (3, b"peer-1")), {}),
    (
        "unregister",
        {"slot": MAX_SLOTS - 1},
        b"x",
        {"unregister": {}},
        ("unregister", (MAX_SLOTS - 1, b"x")),
        {},
    ),
    ("heartbeat", {"slot": 0}, b"peer-2", {}, ("heartbeat", (0, b"peer-2")), {"epoch": 7}),
    ("heartbeat", {"slot": 1}, b"p", {"heartbeat": 9}, ("heartbeat", (1, b"p")), {"epoch": 9}),
    ("heartbeat", {"slot": 2, "pid": 77}, b"p", {}, ("heartbeat", (2, b"p", 77)), {"epoch": 7}),
    (
        "heartbeat",
        {"slot": 2, "arena_id": 2**64 - 1},
        b"p",
        {},
        ("heartbeat", (2, b"p", ("arena_id", 2**64 - 1))),
        {"epoch": 7},
    ),
    ("ping", {}, b"", {}, ("ping", ()), PING),
    ("ping", {}, b"", {"ping": dict(PING, uptime_s=2)}, ("ping", ()), dict(PING, uptime_s=2.0)),
    ("stats", {}, b"", {}, ("snapshot", (2000, False)), {"snapshot": SNAPSHOT}),
    (
        "stats",
        {"deadline_ms": 1, "slow": True},
        b"",
        {"snapshot": SLOW_SNAPSHOT},
        ("snapshot", (1, True)),
        {"snapshot": SLOW_SNAPSHOT},
    ),
    (
        "stats",
        {"deadline_ms": 10000},
        b"",
        {"snapshot": {"snapshot": SNAPSHOT}},
        ("snapshot", (10000, False)),
        {"snapshot": SNAPSHOT},
    ),
    ("check", {}, b"", {}, ("check", ()), CHECK),
    ("release", {}, b"", {}, ("release", ()), {"released_bytes": 8192}),
    ("release", {}, b"", {"release": 0}, ("release", ()), {"released_bytes": 0}),
    ("shutdown", {}, b"", {}, ("request_shutdown", ()), {}),
    ("shutdown", {"force": True}, b"", {}, ("request_shutdown", (("force", True),)), {}),
]


def test_every_op_has_a_round_trip():
    assert {row[0] for row in ROUND_TRIPS} == set(P.OPS)
    assert {row[4][0] for row in ROUND_TRIPS} == set(FakeDaemon().returns)


@pytest.mark.parametrize("op, args, identity, returns, call, reply", ROUND_TRIPS)
@pytest.mark.parametrize("req_id", [17, "req-a", "x" * 64, -(2**63), 2**64 - 1])
def test_round_trip(op, args, identity, returns, call, reply, req_id):
    daemon = FakeDaemon(**returns)
    out = dispatch(daemon, P.encode_request(op, req_id, **args), identity=identity)
    assert daemon.calls == [call]
    assert unpack(out) == {"v": 1, "id": req_id, "ok": True, **reply}
    msg = P.decode_reply(out, op=op)
    assert msg == {"v": 1, "id": req_id, "ok": True, **reply}
    assert [type(msg[k]) for k in reply] == [type(v) for v in reply.values()]


def test_decode_request_fills_defaults():
    req = P.decode_request(pack({"v": 1, "id": 5, "op": "stats"}))
    assert req == {"v": 1, "id": 5, "op": "stats", "deadline_ms": 2000, "slow": False}


def test_identity_comes_from_the_socket_not_the_wire():
    daemon = FakeDaemon()
    dispatch(daemon, P.encode_request("register", 1, pid=7), identity=bytearray(b"\x00k\x8b"))
    assert daemon.calls == [("register", (7, b"\x00k\x8b"))]
    assert type(daemon.calls[0][1][1]) is bytes
    daemon = FakeDaemon()
    out = dispatch(
        daemon, pack({"v": 1, "id": 2, "op": "register", "pid": 7, "_identity": b"evil"}), identity=b"real"
    )
    assert error_of(out)[:2] == ("BAD_ARGS", 2)
    assert daemon.calls == []


# ----------------------------------------------------------------------------- refusals


def ping(**over):
    return pack({"v": 1, "id": 1, "op": "ping", **over})


def req(op, **args):
    return pack({"v": 1, "id": 1, "op": op, **args})


def _frame_of_size(size):
    """A ping with an unknown list field, exactly `size` bytes long."""
    pad = ["x" * 4000] * (size // 4000 + 1)
    frame = ping(pad=pad)
    pad[-1] = "x" * (4000 - (len(frame) - size))  # still a str16: the frame shrinks by as much
    frame = ping(pad=pad)
    assert len(frame) == size
    return frame


# (why, frame, code, id in the error reply)
REFUSALS = [
    ("version 2", ping(v=2), "BAD_VERSION", 1),
    ("version missing", pack({"id": 1, "op": "ping"}), "BAD_VERSION", 1),
    ("version as str", ping(v="1"), "BAD_VERSION", 1),
    ("version as bool", ping(v=True), "BAD_VERSION", 1),
    ("version as float", ping(v=1.0), "BAD_VERSION", 1),
    ("unknown op", ping(op="frobnicate"), "UNKNOWN_OP", 1),
    ("stop is daemon-to-worker only", req("stop", epoch=1), "UNKNOWN_OP", 1),
    ("op missing", pack({"v": 1, "id": 1}), "BAD_REQUEST", 1),
    ("op as int", ping(op=3), "BAD_REQUEST", 1),
    ("op as bin", ping(op=b"ping"), "BAD_REQUEST", 1),
    ("id missing", pack({"v": 1, "op": "ping"}), "BAD_REQUEST", None),
    ("id as float", ping(id=1.5), "BAD_REQUEST", None),
    ("id as bool", ping(id=True), "BAD_REQUEST", None),
    ("id nil", ping(id=None), "BAD_REQUEST", None),
    ("id as list", ping(id=[1]), "BAD_REQUEST", None),
    ("id as bin", ping(id=b"1"), "BAD_REQUEST", None),
    ("id of 65 characters", ping(id="x" * 65), "BAD_REQUEST", None),
    ("id of 4000 characters", ping(id="x" * 4000), "BAD_REQUEST", None),
    ("required field missing", req("register"), "BAD_ARGS", 1),
    ("unknown field", ping(extra=1), "BAD_ARGS", 1),
    ("unknown bin key", pack({"v": 1, "id": 1, "op": "ping", b"x": 1}), "BAD_ARGS", 1),
    ("str for int", req("register", pid="42"), "BAD_ARGS", 1),
    ("bool for int", req("register", pid=True), "BAD_ARGS", 1),
    ("float for int", req("register", pid=42.0), "BAD_ARGS", 1),
    ("nil for int", req("heartbeat", slot=None), "BAD_ARGS", 1),
    ("int for bool", req("stats", slow=1), "BAD_ARGS", 1),
    ("pid 0", req("register", pid=0), "BAD_ARGS", 1),
    ("pid -1", req("register", pid=-1), "BAD_ARGS", 1),
    ("pid 2**31", req("register", pid=2**31), "BAD_ARGS", 1),
    ("slot -1", req("unregister", slot=-1), "BAD_ARGS", 1),
    ("register slot -2", req("register", pid=7, slot=-2), "BAD_ARGS", 1),
    ("slot MAX_SLOTS", req("heartbeat", slot=MAX_SLOTS), "BAD_ARGS", 1),
    ("slot 2**64-1", req("heartbeat", slot=2**64 - 1), "BAD_ARGS", 1),
    ("deadline 0", req("stats", deadline_ms=0), "BAD_ARGS", 1),
    ("deadline 10001", req("stats", deadline_ms=10001), "BAD_ARGS", 1),
    ("frame of MAX_FRAME bytes is unpacked", _frame_of_size(P.MAX_FRAME), "BAD_ARGS", 1),
    ("frame of MAX_FRAME + 1 bytes", _frame_of_size(P.MAX_FRAME + 1), "TOO_LARGE", None),
    ("oversize garbage", b"\xc1" * (P.MAX_FRAME + 1), "TOO_LARGE", None),
    ("empty", b"", "BAD_FRAME", None),
    ("truncated", ping()[:-1], "BAD_FRAME", None),
    ("truncated map header", b"\x83", "BAD_FRAME", None),
    ("trailing bytes", ping() + b"\x00", "BAD_FRAME", None),
    ("two requests", ping() + ping(), "BAD_FRAME", None),
    ("never-used byte 0xc1", b"\xc1", "BAD_FRAME", None),
    ("random bytes", b"\xde\xad\xbe\xef", "BAD_FRAME", None),
    ("invalid UTF-8", b"\x81\xa1v\xa2\xff\xfe", "BAD_FRAME", None),
    ("int map key", pack({1: 2}), "BAD_FRAME", None),
    ("nested int map key", ping(x={1: 2}), "BAD_FRAME", None),
    ("array declaring 2**32-1 items", b"\xdd\xff\xff\xff\xff", "BAD_FRAME", None),
    ("map declaring 2**32-1 keys", b"\xdf\xff\xff\xff\xff", "BAD_FRAME", None),
    ("str declaring 2**32-1 bytes", b"\xdb\xff\xff\xff\xff", "BAD_FRAME", None),
    ("str over 4096 bytes", ping(pad="x" * 4097), "BAD_FRAME", None),
    ("nested 5000 deep", b"\x91" * 5000 + b"\x00", "BAD_FRAME", None),
    ("array", pack([1, 2]), "BAD_REQUEST", None),
    ("int", pack(1), "BAD_REQUEST", None),
    ("nil", pack(None), "BAD_REQUEST", None),
    ("str", pack("ping"), "BAD_REQUEST", None),
]


@pytest.mark.parametrize("why, frame, code, req_id", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusal(why, frame, code, req_id):
    daemon = FakeDaemon()
    out = dispatch(daemon, frame)
    assert error_of(out)[:2] == (code, req_id)
    assert daemon.calls == []
    with pytest.raises(E.ProtocolError) as info:
        P.decode_request(frame)
    assert info.value.code == code and info.value.req_id == req_id


def test_oversize_frame_is_not_unpacked(monkeypatch):
    def unpackb(*args, **kwargs):
        raise AssertionError("an oversize frame was unpacked")

    monkeypatch.setattr(msgpack, "unpackb", unpackb)
    assert error_of(dispatch(FakeDaemon(), ping(pad=["x" * 4000] * 17)))[0] == "TOO_LARGE"
    assert error_of(dispatch(FakeDaemon(), ping()))[0] == "BAD_FRAME"  # the patch is in force


@pytest.mark.parametrize("frame", ["ping", None, 42, [1]])
def test_a_frame_that_is_not_bytes(frame):
    assert error_of(dispatch(FakeDaemon(), frame))[:2] == ("BAD_FRAME", None)


def test_messages_name_the_problem():
    cases = [
        (req("register", pid=True), ["pid", "int", "bool"]),
        (ping(extra=1), ["extra"]),
        (req("register"), ["pid", "missing"]),
        (req("stats", deadline_ms=0), ["deadline_ms", "1..10000"]),
        (ping(op="frobnicate"), ["frobnicate", "register"]),
        (ping(v=2), ["2"]),
    ]
    for frame, words in cases:
        message = error_of(dispatch(FakeDaemon(), frame))[2]
        assert all(w in message for w in words), (message, words)


# ----------------------------------------------------------------------------- exceptions


class CustomError(E.ShmallocError):
    """Defined outside shm/errors.py: must not appear in docs/PROTOCOL.md."""

    code = "CUSTOM"


class Unprintable(Exception):
    def __str__(self):
        raise ValueError("no")


# (exception the daemon raises, code, words of the message)
RAISES = [
    (E.NoFreeSlot("all 8 slots are taken"), "NO_FREE_SLOT", "all 8 slots are taken"),
    (E.OutOfMemory("heap full"), "OUT_OF_MEMORY", "heap full"),
    (E.BadHandle("0x40 is not an object"), "BAD_HANDLE", "0x40 is not an object"),
    (E.DoubleFree("0x40 is already free"), "DOUBLE_FREE", "0x40 is already free"),
    (E.CorruptionError("span 3 count"), "CORRUPTION", "span 3 count"),
    (E.NotRegistered("slot 2 is not held"), "NOT_REGISTERED", "slot 2 is not held"),
    (E.ProtocolError("slot 2 is not yours", code="BAD_ARGS"), "BAD_ARGS", "slot 2 is not yours"),
    (CustomError("custom"), "CUSTOM", "custom"),
    (RuntimeError("boom"), "INTERNAL", "RuntimeError: boom"),
    (KeyError("k"), "INTERNAL", "KeyError: 'k'"),
    (ZeroDivisionError(), "INTERNAL", "ZeroDivisionError"),
    (MemoryError(), "INTERNAL", "MemoryError"),
    (Unprintable(), "INTERNAL", "Unprintable"),
    (RuntimeError("\ud800 lone surrogate"), "INTERNAL", "lone surrogate"),
]


@pytest.mark.parametrize("exc, code, words", RAISES, ids=[type(r[0]).__name__ for r in RAISES])
def test_daemon_exception_becomes_error_reply(exc, code, words):
    daemon = FakeDaemon(ping=exc)
    out = dispatch(daemon, P.encode_request("ping", "r1"))
    assert daemon.calls == [("ping", ())]
    got_code, got_id, message = error_of(out)
    assert (got_code, got_id) == (code, "r1") and words in message
    assert P.error_code(exc) == code
    with pytest.raises(E.RemoteError) as info:
        P.decode_reply(out)
    assert isinstance(info.value, E.ProtocolError)
    assert (info.value.code, str(info.value), info.value.req_id) == (code, message, "r1")


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), SystemExit(3)])
def test_interrupts_propagate(exc):
    with pytest.raises(type(exc)):
        dispatch(FakeDaemon(ping=exc), P.encode_request("ping", 1))


def test_error_message_is_bounded():
    _code, _id, message = error_of(P.encode_error(1, RuntimeError("x" * 100000)))
    assert len(message) <= P.MAX_MESSAGE and message.startswith("RuntimeError: xxx")


def test_encode_error_drops_an_invalid_id():
    for bad in ("x" * 65, 1.5, True, object(), 2**64):
        assert error_of(P.encode_error(bad, RuntimeError()))[1] is None
    assert error_of(P.encode_error("ok-id", RuntimeError()))[1] == "ok-id"


# (why, op, daemon returns, request args): a handler reply that breaks the op's reply fields
BAD_HANDLER_REPLIES = [
    ("missing field", "ping", {"ping": {k: v for k, v in PING.items() if k != "pid"}}, {}),
    ("str for int", "ping", {"ping": dict(PING, pid="1")}, {}),
    ("bool for int", "ping", {"ping": dict(PING, num_p=True)}, {}),
    ("str for float", "ping", {"ping": dict(PING, uptime_s="1.5")}, {}),
    ("unknown field", "ping", {"ping": dict(PING, extra=1)}, {}),
    ("envelope field", "check", {"check": dict(CHECK, ok=False)}, {}),
    ("None for a map", "register", {"register": None}, {"pid": 5}),
    ("bare value for two fields", "check", {"check": []}, {}),
    ("field for an empty reply", "shutdown", {"request_shutdown": {"bye": 1}}, {}),
    (
        "snapshot lacks a key",
        "stats",
        {"snapshot": {k: v for k, v in SNAPSHOT.items() if k != "heap_alloc"}},
        {},
    ),
    ("slow snapshot lacks slow_diff", "stats", {"snapshot": dict(SNAPSHOT, slow_equal=True)}, {"slow": True}),
    ("int map key", "stats", {"snapshot": dict(SNAPSHOT, per_p=[{0: "p"}])}, {}),
    ("int over 64 bits", "release", {"release": 2**64}, {}),
    ("a set", "check", {"check": dict(CHECK, problems=[{"x"}])}, {}),
    ("an object", "stats", {"snapshot": dict(SNAPSHOT, sys=object())}, {}),
]


@pytest.mark.parametrize(
    "why, op, returns, args", BAD_HANDLER_REPLIES, ids=[r[0] for r in BAD_HANDLER_REPLIES]
)
def test_bad_handler_reply_is_internal(why, op, returns, args):
    daemon = FakeDaemon(**returns)
    out = dispatch(daemon, P.encode_request(op, 5, **args))
    assert len(daemon.calls) == 1
    assert error_of(out)[:2] == ("INTERNAL", 5)


# ----------------------------------------------------------------------------- client side


def test_encode_request_validates_like_the_daemon():
    for op, args, code in [
        ("frobnicate", {}, "UNKNOWN_OP"),
        ("stop", {"epoch": 1}, "UNKNOWN_OP"),
        ("register", {}, "BAD_ARGS"),
        ("register", {"pid": True}, "BAD_ARGS"),
        ("register", {"pid": 1, "_identity": b"x"}, "BAD_ARGS"),
        ("stats", {"deadline_ms": 0}, "BAD_ARGS"),
    ]:
        with pytest.raises(E.ProtocolError) as info:
            P.encode_request(op, 1, **args)
        assert info.value.code == code, (op, args)
    for bad_id in (None, 1.0, True, "x" * 65, 2**64):
        with pytest.raises(E.ProtocolError) as info:
            P.encode_request("ping", bad_id)
        assert info.value.code == "BAD_REQUEST"
    assert unpack(P.encode_request("stats", 3, slow=True)) == {"v": 1, "id": 3, "op": "stats", "slow": True}


def test_stop_message():
    frame = P.encode_stop(42)
    assert unpack(frame) == {"v": 1, "op": "stop", "epoch": 42}
    assert P.decode_reply(frame) == {"v": 1, "op": "stop", "epoch": 42}
    assert P.decode_reply(frame, op="ping") == {"v": 1, "op": "stop", "epoch": 42}
    for bad in (0, -1, True, 1.0, "1", 2**63):
        with pytest.raises(E.ProtocolError):
            P.encode_stop(bad)


# (why, frame, code) of frames a client must refuse
BAD_REPLIES = [
    ("not a map", pack([1]), "BAD_REPLY"),
    ("version 2", pack({"v": 2, "id": 1, "ok": True}), "BAD_VERSION"),
    ("version missing", pack({"id": 1, "ok": True}), "BAD_VERSION"),
    ("ok missing", pack({"v": 1, "id": 1}), "BAD_REPLY"),
    ("ok as int", pack({"v": 1, "id": 1, "ok": 1}), "BAD_REPLY"),
    ("id missing", pack({"v": 1, "ok": True}), "BAD_REPLY"),
    ("id as float", pack({"v": 1, "id": 1.0, "ok": True}), "BAD_REPLY"),
    ("error without message", pack({"v": 1, "id": 1, "ok": False, "error": "X"}), "BAD_REPLY"),
    ("error code not str", pack({"v": 1, "id": 1, "ok": False, "error": 3, "message": "m"}), "BAD_REPLY"),
    (
        "error with extra field",
        pack({"v": 1, "id": 1, "ok": False, "error": "X", "message": "m", "x": 1}),
        "BAD_REPLY",
    ),
    ("stop without epoch", pack({"v": 1, "op": "stop"}), "BAD_REPLY"),
    ("stop epoch str", pack({"v": 1, "op": "stop", "epoch": "1"}), "BAD_REPLY"),
    ("stop with id", pack({"v": 1, "op": "stop", "epoch": 1, "id": 1}), "BAD_REPLY"),
    ("unknown message", pack({"v": 1, "op": "start", "epoch": 1}), "BAD_REPLY"),
    ("truncated", P.encode_reply(1, x=1)[:-1], "BAD_FRAME"),
    ("empty", b"", "BAD_FRAME"),
]


@pytest.mark.parametrize("why, frame, code", BAD_REPLIES, ids=[r[0] for r in BAD_REPLIES])
def test_decode_reply_refuses(why, frame, code):
    with pytest.raises(E.ProtocolError) as info:
        P.decode_reply(frame)
    assert not isinstance(info.value, E.RemoteError)
    assert info.value.code == code


def test_decode_reply_checks_the_op_reply_fields():
    good = P.encode_reply(1, **PING)
    assert P.decode_reply(good, op="ping")["pid"] == PING["pid"]
    assert P.decode_reply(P.encode_reply(1, **dict(PING, uptime_s=3)), op="ping")["uptime_s"] == 3.0
    for bad in ({k: v for k, v in PING.items() if k != "epoch"}, dict(PING, pid=True), dict(PING, x=1)):
        with pytest.raises(E.ProtocolError) as info:
            P.decode_reply(P.encode_reply(1, **bad), op="ping")
        assert info.value.code == "BAD_REPLY"
    assert P.decode_reply(P.encode_reply(1, **dict(PING, x=1)))["x"] == 1  # unchecked without op


def test_encode_reply_refuses_envelope_fields():
    for clash in ("ok", "error", "message", "v"):
        with pytest.raises(E.ProtocolError) as info:
            P.encode_reply(1, **{clash: 1})
        assert info.value.code == "INTERNAL"


@pytest.mark.parametrize("nfields", [0, 1, 12, 13, 40])
def test_a_reply_packed_once_is_the_reply_encoded_per_request(nfields):
    # One pause answers many requests: their replies are the shared fields packed once, grown by
    # each id -- the very bytes encode_reply makes (12 fields: the last fixmap; 13: a map16).
    fields = {f"f{i}": [i, {"x": None, "y": "s" * i}] for i in range(nfields)}
    packed = P.pack_reply_fields(**fields)
    for req_id in (0, 7, -(2**63), 2**64 - 1, "", "a string id"):
        frame = P.encode_packed_reply(req_id, packed)
        assert frame == P.encode_reply(req_id, **fields)
        assert msgpack.unpackb(frame) == {"v": 1, "id": req_id, "ok": True, **fields}
    with pytest.raises(E.ProtocolError) as info:
        P.encode_packed_reply(True, packed)
    assert info.value.code == "INTERNAL"
    with pytest.raises(E.ProtocolError) as info:
        P.pack_reply_fields(ok=1)
    assert info.value.code == "INTERNAL"


# ----------------------------------------------------------------------------- properties

wire_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12)
)
wire_values = st.recursive(
    wire_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["pid", "slot", "deadline_ms", "slow", "_identity", "extra"]) | st.text(
    max_size=6
)
field_values = st.integers(-3, 70000) | st.integers(2**31 - 2, 2**31 + 1) | st.booleans() | wire_values
near_requests = st.builds(
    lambda envelope, fields: {**fields, **envelope},
    st.fixed_dictionaries(
        {},
        optional={
            "v": st.just(1) | wire_values,
            "id": st.integers(-(2**63), 2**64 - 1) | st.text(max_size=70) | wire_values,
            "op": st.sampled_from(sorted(P.OPS) + ["stop", "nope"]) | wire_values,
        },
    ),
    st.dictionaries(field_names, field_values, max_size=4),
)


def _plausible(op):
    """Requests for `op` that are often valid: each field present or not, in or just out of bounds."""

    def values(f):
        if f.type is bool:
            return st.booleans() | st.integers(0, 1)
        # One past each bound -- but no further than msgpack can carry (a uint64 at most).
        lo, hi = max(f.bounds[0] - 1, INT64_MIN), min(f.bounds[1] + 1, UINT64_MAX)
        return st.integers(lo, hi) | st.sampled_from(f.bounds) | st.booleans()

    return st.fixed_dictionaries(
        {"v": st.just(1), "id": st.integers(-5, 5) | st.text(max_size=64), "op": st.just(op)},
        optional={name: values(f) for name, f in P.OPS[op].request.items()},
    )


plausible_requests = st.sampled_from(sorted(P.OPS)).flatmap(_plausible)


def assert_answers(frame):
    """dispatch answers `frame` with one valid reply, ok exactly when decode_request accepts it,
    calling the daemon exactly then."""
    daemon = FakeDaemon(snapshot=SLOW_SNAPSHOT)
    out = dispatch(daemon, frame)
    assert type(out) is bytes
    try:
        req = P.decode_request(frame)
    except E.ProtocolError as exc:
        code, req_id, _message = error_of(out)
        assert (code, req_id) == (exc.code, exc.req_id)
        assert code in DOCUMENTED_CODES
        assert daemon.calls == []
        return None
    assert len(daemon.calls) == 1
    assert P.decode_reply(out, op=req["op"])["id"] == req["id"]
    return req


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_dispatch_answers_any_bytes(frame):
    assert_answers(frame)


@pytest.mark.slow
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plausible_requests | near_requests | wire_values)
def test_dispatch_answers_any_msgpack_structure(obj):
    assert_answers(pack(obj))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ROUND_TRIPS), st.data())
def test_dispatch_answers_damaged_requests(row, data):
    op, args = row[0], row[1]
    frame = bytearray(P.encode_request(op, 9, **args))
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        i = data.draw(st.integers(0, len(frame) - 1)) if frame else 0
        if kind == "flip" and frame:
            frame[i] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del frame[i:]
        else:
            frame[i:i] = data.draw(st.binary(min_size=1, max_size=4))
    assert_answers(bytes(frame))


def test_properties_reach_valid_requests():
    # The structures must reach every op's handler too, or the property proves little.
    found = set()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None)
    @given(plausible_requests)
    def collect(obj):
        req = assert_answers(pack(obj))
        if req is not None:
            found.add(req["op"])

    collect()
    assert found == set(P.OPS)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | wire_values.map(pack) | near_requests.map(pack))
def test_decode_reply_raises_only_protocol_errors(frame):
    try:
        msg = P.decode_reply(frame)
    except E.ProtocolError:
        return
    assert msg["v"] == 1 and (msg.get("op") == "stop" or msg["ok"] is True)


# ----------------------------------------------------------------------------- registry and docs


def test_every_ops_module_is_registered():
    names = {m.name for m in pkgutil.iter_modules(client.ops.__path__)} - {"schema"}
    assert names == set(P.OPS) == {m.__name__.rpartition(".")[2] for m in client.ops.MODULES}
    assert list(HANDLERS) == list(P.OPS) and set(CHECK_REPLY) <= set(P.OPS)


def _examples(doc, label):
    m = re.search(rf"^{label}::\n\n((?:    .*\n?)+)", doc, re.M)
    assert m, f"no {label}:: example"
    return json.loads(m.group(1))


@pytest.mark.parametrize("name", sorted(P.OPS))
def test_op_docstring_is_its_spec(name):
    spec = P.OPS[name]
    assert spec.doc.startswith(f"{name}:")
    for field in list(spec.request) + list(spec.reply):
        assert f'"{field}"' in spec.doc, f"the docstring of {name} never shows {field}"
    request = _examples(spec.doc, "Request")
    assert P.decode_request(pack(request))["op"] == name
    reply = _examples(spec.doc, "Reply")
    assert P.decode_reply(pack(reply), op=name)["id"] == request["id"]


def test_op_module_checks():
    def module(name, doc=None, request=None, reply=None):
        m = types.ModuleType(f"client.ops.{name}", doc if doc is not None else f"{name}: test op.")
        m.REQUEST, m.REPLY, m.handle = request or {}, reply or {}, lambda daemon, req: None
        return m

    assert P.OpSpec.from_module(module("fine")).name == "fine"
    for bad in (
        module("nodoc", doc=""),
        module("wrongdoc", doc="other: x"),
        module("ident", request={"_identity": Field(bytes, True, None, "")}),
        module("envelope", request={"id": Field(int, True, None, "")}),
        module("replyok", reply={"ok": Reply(bool, "")}),
        module("replyop", reply={"op": Reply(str, "")}),
    ):
        with pytest.raises(TypeError):
            P.OpSpec.from_module(bad)
    with pytest.raises(E.ProtocolError):  # a default outside its own bounds
        P.OpSpec.from_module(module("baddefault", request={"n": Field(int, False, (1, 2), "", 0)}))


def test_error_tree_codes_are_unique():
    codes = [cls.code for cls, _ in MK._error_tree()]
    assert len(codes) == len(set(codes)) >= 13
    assert not (set(codes) - {"BAD_REQUEST"}) & set(P.CODES)


def test_every_code_in_the_source_is_documented():
    sources = [ROOT / "client" / "protocol.py", ROOT / "service" / "handlers.py"] + sorted(
        (ROOT / "client" / "ops").glob("*.py")
    )
    used = set()
    for path in sources:
        text = path.read_text()
        used |= set(re.findall(r'"([A-Z][A-Z_]+)"(?:\)|, req_id\))', text))  # code="X") and f(..., "X")
    assert {"BAD_FRAME", "TOO_LARGE", "BAD_ARGS", "INTERNAL"} <= used
    assert used <= DOCUMENTED_CODES, used - DOCUMENTED_CODES


def test_markdown_documents_every_code_and_op():
    text = MK.markdown()
    for code in DOCUMENTED_CODES:
        assert f"| `{code}` |" in text, code
    for name, spec in P.OPS.items():
        assert f"### `{name}`" in text and spec.doc in text
    assert "CUSTOM" not in text  # CustomError above is not in shm/errors.py
    for name, _unit, _doc in stats_op.SNAPSHOT_KEYS + stats_op.SLOW_KEYS:
        assert f"| `{name}` |" in text


def test_checked_in_protocol_doc_is_generated():
    path = ROOT / "docs" / "PROTOCOL.md"
    assert path.read_text() == MK.markdown(), "docs/PROTOCOL.md is stale: python tools/mkprotocol.py"


def test_markdown_command():
    out = subprocess.run(
        [sys.executable, "tools/mkprotocol.py", "--stdout"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout == MK.markdown()
