"""Issue 9: over tcp://, ZeroMQ CURVE.  Keys made with `shmalloc keys`; a daemon on a loopback
port started with --curve-server-key/--curve-clients; the CLI and the library as clients with a
key the daemon knows (trusted: pids shown, admin ops served), with one it does not, and with
none (never answered).  Timeouts here only turn hangs into failures."""

import json
import os
import socket
import stat
import subprocess
import types

import pytest
import zmq
from support import DEADLINE, EXE, ROOT

import client

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args, env=None):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, cwd=ROOT, timeout=DEADLINE, env=env)


def _read(path):
    with open(path) as f:
        return f.read()


def _keys(directory, name):
    r = _cli("keys", str(directory), "--name", name)
    assert r.returncode == 0, r.stderr
    return types.SimpleNamespace(public=f"{directory}/{name}.key", secret=f"{directory}/{name}.key_secret")


@pytest.fixture
def keys(tmp_path):
    """server, alice (let in) and mallory (not let in), made by `shmalloc keys`."""
    kdir, clients = tmp_path / "keys", tmp_path / "clients"
    ks = types.SimpleNamespace(
        server=_keys(kdir, "server"), alice=_keys(kdir, "alice"), mallory=_keys(kdir, "mallory")
    )
    clients.mkdir()
    (clients / "alice.key").write_text(_read(ks.alice.public))
    ks.clients = str(clients)
    ks.alice_curve = (ks.alice.secret, ks.server.public)
    ks.mallory_curve = (ks.mallory.secret, ks.server.public)
    return ks


def _curve_options(keys):
    return ("--curve-server-key", keys.server.secret, "--curve-clients", keys.clients)


@pytest.fixture
def curve_daemon(start_daemon, keys):
    return start_daemon(
        endpoint=f"tcp://127.0.0.1:{_free_port()}", extra=_curve_options(keys), curve=keys.alice_curve
    )


def test_keys_writes_a_private_secret_and_never_overwrites(tmp_path):
    k = _keys(tmp_path / "k", "server")
    assert stat.S_IMODE(os.stat(k.secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(k.public).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o700
    assert "secret-key" in _read(k.secret) and "secret-key" not in _read(k.public)
    before = _read(k.secret)
    r = _cli("keys", str(tmp_path / "k"), "--name", "server")
    assert r.returncode == 1 and "exists" in r.stderr
    assert _read(k.secret) == before
    assert _cli("keys", str(tmp_path / "k"), "--name", "server", "--force").returncode == 0
    assert _read(k.secret) != before
    assert stat.S_IMODE(os.stat(k.secret).st_mode) == 0o600


def test_the_cli_gets_a_trusted_snapshot_over_curve(curve_daemon, keys):
    d = curve_daemon
    with client.connect(d.endpoint, curve=keys.alice_curve) as heap:  # a worker over CURVE too
        b = heap.alloc(1000)
        r = _cli(
            "stats",
            "--endpoint",
            d.endpoint,
            "--json",
            "--curve-client-key",
            keys.alice.secret,
            "--curve-server-key",
            keys.server.public,
        )
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["consistent"] and [p["pid"] for p in snap["per_p"]] == [os.getpid()]
        # The same from the environment.
        env = dict(
            os.environ,
            SHMALLOC_CURVE_CLIENT_KEY=keys.alice.secret,
            SHMALLOC_CURVE_SERVER_KEY=keys.server.public,
        )
        r = _cli("stats", "--endpoint", d.endpoint, "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert [p["pid"] for p in json.loads(r.stdout)["per_p"]] == [os.getpid()]
        assert client.ping(d.endpoint, curve=keys.alice_curve)["pid"] == d.proc.pid
        heap.free(b)
    assert "CURVE authentication on" in d.log()


def test_an_unknown_key_is_never_answered(curve_daemon, keys):
    d = curve_daemon
    with pytest.raises(client.DaemonUnavailable) as e:
        client.ping(d.endpoint, 500, curve=keys.mallory_curve)
    assert "CURVE" in str(e.value)
    with pytest.raises(client.DaemonUnavailable):
        client.request(d.endpoint, "shutdown", 500, curve=keys.mallory_curve)
    # A client that takes the server's key for its own is no better.
    with pytest.raises(client.DaemonUnavailable):
        client.ping(d.endpoint, 500, curve=(keys.server.secret, keys.server.public))
    r = _cli(
        "stats",
        "--endpoint",
        d.endpoint,
        "--deadline-ms",
        "100",
        "--curve-client-key",
        keys.mallory.secret,
        "--curve-server-key",
        keys.server.public,
    )
    assert r.returncode == 2 and "DaemonUnavailable" in r.stderr and "CURVE" in r.stderr
    # The daemon is fine.
    assert d.proc.poll() is None
    assert client.stats(d.endpoint, curve=keys.alice_curve)["consistent"]


def test_a_plain_client_is_never_answered(curve_daemon, keys):
    d = curve_daemon
    with pytest.raises(client.DaemonUnavailable) as e:
        client.ping(d.endpoint, 500, curve=False)
    assert "CURVE" in str(e.value)  # the hint: give the keys
    r = _cli("stats", "--endpoint", d.endpoint, "--deadline-ms", "100")
    assert r.returncode == 2 and "DaemonUnavailable" in r.stderr
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.endpoint)
    try:
        s.send(client.protocol.encode_request("ping", 1))
        assert not s.poll(500)
    finally:
        s.close(0)
    assert d.proc.poll() is None
    assert client.ping(d.endpoint, curve=keys.alice_curve)["pid"] == d.proc.pid


def test_admin_ops_are_served_to_an_authenticated_peer(curve_daemon, keys):
    """Over plain tcp:// these are refused without a worker's token (test_security.py)."""
    d = curve_daemon
    assert client.check(d.endpoint, curve=keys.alice_curve)["problems"] == []
    assert "released_bytes" in client.request(d.endpoint, "release", 30000, curve=keys.alice_curve)
    assert client.request(d.endpoint, "shutdown", 5000, curve=keys.alice_curve)["ok"]
    assert d.proc.wait(DEADLINE) == 0, d.log()
    assert not os.path.exists(f"/dev/shm/{d.name}")
    assert "stopped" in d.log()


def test_a_non_loopback_bind_with_curve_needs_no_insecure(start_daemon, keys):
    port = _free_port()
    d = start_daemon(endpoint=f"tcp://0.0.0.0:{port}", extra=_curve_options(keys), curve=keys.alice_curve)
    assert "without authentication" not in d.log()
    assert client.ping(f"tcp://127.0.0.1:{port}", curve=keys.alice_curve)["pid"] == d.proc.pid


def _refused(start_daemon, endpoint, extra):
    d = start_daemon(endpoint=endpoint, extra=extra, expect_up=False)
    assert d.proc.wait(DEADLINE) == 2, d.log()
    return d.log()


def test_bad_curve_options_refuse_to_start(start_daemon, keys, tmp_path):
    tcp = f"tcp://127.0.0.1:{_free_port()}"
    log = _refused(start_daemon, f"ipc://{tmp_path}/control.sock", _curve_options(keys))
    assert "for tcp:// endpoints" in log, log
    log = _refused(start_daemon, tcp, ("--curve-server-key", keys.server.secret))
    assert "needs both" in log, log
    log = _refused(
        start_daemon, tcp, ("--curve-server-key", f"{tmp_path}/nope", "--curve-clients", keys.clients)
    )
    assert "cannot read" in log and "nope" in log, log
    log = _refused(
        start_daemon, tcp, ("--curve-server-key", keys.server.public, "--curve-clients", keys.clients)
    )
    assert "no secret key" in log, log
    (tmp_path / "empty").mkdir()
    log = _refused(
        start_daemon, tcp, ("--curve-server-key", keys.server.secret, "--curve-clients", f"{tmp_path}/empty")
    )
    assert "no public certificate" in log, log


def test_bad_client_keys_are_reported(tmp_path, keys, monkeypatch):
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    with pytest.raises(client.CurveKeyError, match="no secret key"):
        client.ping(endpoint, 100, curve=(keys.alice.public, keys.server.public))
    with pytest.raises(client.CurveKeyError, match="cannot read"):
        client.ping(endpoint, 100, curve=(keys.alice.secret, f"{tmp_path}/nope"))
    monkeypatch.setenv("SHMALLOC_CURVE_CLIENT_KEY", keys.alice.secret)
    with pytest.raises(client.CurveKeyError, match="both"):
        client.ping(endpoint, 100)
    r = _cli("stats", "--endpoint", endpoint, "--curve-client-key", keys.alice.secret)
    assert r.returncode == 2 and "both" in r.stderr


def test_cleanup_keeps_the_arena_of_a_daemon_that_does_not_answer(curve_daemon, keys):
    """A CURVE daemon never answers a stranger's ping; its arena is still not removed."""
    d = curve_daemon
    r = _cli("cleanup", "--endpoint", d.endpoint, "--name", d.name)
    assert r.returncode == 1 and f"pid {d.proc.pid}" in r.stderr, r.stdout + r.stderr
    assert os.path.exists(f"/dev/shm/{d.name}")
    assert client.ping(d.endpoint, curve=keys.alice_curve)["pid"] == d.proc.pid
