"""Issue 9: nobody else's arena, nobody else's control.  A second local user (made with useradd
here) pre-creates the segment and the socket directory; clients without the proof of a slot
try to hijack workers, shut the daemon down, flood it with snapshots and long deadlines, over
ipc and over TCP."""

import os
import pickle
import pwd
import shutil
import socket
import stat
import subprocess
import time
import uuid

import msgpack
import pytest
import zmq
from support import DEADLINE, unique_name

import client
from client import protocol
from service.security import endpoint_id
from shm import Arena
from shm import layout as L

# --- a second local user ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_user():
    """A throwaway local user (useradd), removed at the end (userdel)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a second local user with useradd")
    if shutil.which("useradd") is None or shutil.which("userdel") is None:
        pytest.skip("useradd/userdel not installed: cannot make a second local user")
    name = f"shmt{uuid.uuid4().hex[:8]}"
    r = subprocess.run(
        ["useradd", "--no-create-home", "--shell", "/bin/false", name], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"useradd failed: {r.stderr.strip()}")
    pw = pwd.getpwnam(name)
    try:
        yield pw
    finally:
        subprocess.run(["userdel", name], capture_output=True)


def as_user(pw, fn, *args):
    """Run fn(*args) in a forked child that became user `pw`; returns its result or its
    exception (pickled back), never raises it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            try:
                out = ("ok", fn(*args))
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = ("err", f"{type(e).__name__}: {e}")
            os.write(w, pickle.dumps(out))
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return pickle.loads(data)


def _make_dir(path, mode):
    os.mkdir(path)
    os.chmod(path, mode)
    return path


def _read_all(path):
    with open(path, "rb") as f:
        return f.read()


def _start_refused(start_daemon, **kw):
    d = start_daemon(expect_up=False, **kw)
    assert d.proc.wait(DEADLINE) == 2, d.log()
    return d


# --- ownership: the segment -------------------------------------------------------------------


def test_a_segment_another_user_made_is_not_adopted(start_daemon, tmp_path, other_user):
    """The other user pre-creates the arena's segment 0666 -- a valid arena whose header even names
    our endpoint -- and gets nothing: the daemon refuses, naming the file and its owner."""
    endpoint = f"ipc://{tmp_path}/control.sock"
    name = unique_name("foreign")
    bait = Arena.create(name, 1 << 20, 4)
    try:
        bait.q[L.HDR["endpoint_id"]] = endpoint_id(endpoint)
        os.fchown(bait.fd, other_user.pw_uid, other_user.pw_gid)
        os.fchmod(bait.fd, 0o666)
        d = _start_refused(start_daemon, endpoint=endpoint, name=name)
        log = d.log()
        assert f"/dev/shm/{name}" in log and other_user.pw_name in log and "not adopted" in log, log
        assert bait.q[L.HDR["daemon_pid"]] == 0, "the daemon wrote into a foreign segment"
        assert not os.path.exists(f"{tmp_path}/control.sock")
    finally:
        bait.destroy()


def test_an_open_or_foreign_arena_of_our_own_is_not_adopted(start_daemon, tmp_path):
    endpoint = f"ipc://{tmp_path}/control.sock"
    name = unique_name("open")
    bait = Arena.create(name, 1 << 20, 4)
    try:
        bait.q[L.HDR["endpoint_id"]] = endpoint_id(endpoint)
        os.fchmod(bait.fd, 0o666)
        d = _start_refused(start_daemon, endpoint=endpoint, name=name)
        assert "mode 0666" in d.log() and "not adopted" in d.log(), d.log()
        os.fchmod(bait.fd, 0o600)
        bait.q[L.HDR["endpoint_id"]] = endpoint_id("ipc:///somewhere/else.sock")
        d = _start_refused(start_daemon, endpoint=endpoint, name=name)
        assert "not one a shmalloc daemon made for" in d.log(), d.log()
        assert bait.q[L.HDR["daemon_pid"]] == 0
    finally:
        bait.destroy()


def test_a_new_segment_is_made_exclusively_and_private(start_daemon, other_user):
    d = start_daemon()
    st = os.stat(f"/dev/shm/{d.name}")
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    with client.connect(d.endpoint) as heap:
        b = heap.alloc(4096)
        b.buf[:16] = b"root's secret!!!"
        # Not readable, not writable, not even the socket reachable for the other user.
        got = as_user(other_user, _read_all, f"/dev/shm/{d.name}")
        assert got[0] == "err" and "Permission" in got[1], got
        got = as_user(other_user, os.stat, d.sock_path())
        assert got[0] == "err" and "Permission" in got[1], got
        heap.free(b)


# --- ownership: the socket directory ------------------------------------------------------------


def test_a_socket_directory_another_user_made_is_refused(start_daemon, other_user):
    base = f"/tmp/shmalloc-test-{uuid.uuid4().hex[:8]}"
    res = as_user(other_user, _make_dir, base, 0o777)
    assert res[0] == "ok", res
    try:
        d = _start_refused(start_daemon, endpoint=f"ipc://{base}/control.sock")
        assert base in d.log() and other_user.pw_name in d.log() and "refused" in d.log(), d.log()
        assert os.listdir(base) == [], "the daemon made a socket in a foreign directory"
    finally:
        shutil.rmtree(base)


def test_a_writable_socket_directory_of_our_own_is_refused(start_daemon, tmp_path):
    base = _make_dir(f"{tmp_path}/open", 0o777)
    d = _start_refused(start_daemon, endpoint=f"ipc://{base}/control.sock")
    assert "writable by others" in d.log(), d.log()
    os.chmod(base, 0o750)
    d = start_daemon(endpoint=f"ipc://{base}/control.sock")
    assert client.ping(d.endpoint)["pid"] == d.proc.pid


def test_the_default_socket_directory_is_made_private(start_daemon, tmp_path):
    base = f"{tmp_path}/made"
    d = start_daemon(endpoint=f"ipc://{base}/control.sock")
    assert stat.S_IMODE(os.stat(base).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d.sock_path()).st_mode) == 0o600


# --- authorization: the slot token --------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(endpoint, op, **args):
    with pytest.raises(client.RemoteError) as e:
        client.request(endpoint, op, 3000, **args)
    assert e.value.code == "FORBIDDEN", e.value
    return str(e.value)


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_hijack_attempts_without_the_slot_token_are_refused(start_daemon, transport):
    d = start_daemon(endpoint=f"tcp://127.0.0.1:{_free_port()}" if transport == "tcp" else None)
    with client.connect(d.endpoint) as heap:
        pid, slot, token = os.getpid(), heap.slot, heap.arena.registry.token(heap.slot)
        _refused(d.endpoint, "heartbeat", slot=slot)
        _refused(d.endpoint, "heartbeat", slot=slot, pid=pid)
        _refused(d.endpoint, "heartbeat", slot=slot, pid=pid, token=token ^ 1)
        _refused(d.endpoint, "register", pid=pid)
        _refused(d.endpoint, "register", pid=pid, slot=slot, token=token + 1)
        _refused(d.endpoint, "unregister", slot=slot)
        assert "P re-registered" not in d.log() and d.log().count("P joined") == 1
        # The real worker is still the voice of its slot: a snapshot parks it, every cache flushed.
        b = heap.alloc(100)
        snap = heap.stats(slow=True)
        assert snap["consistent"] and snap["slow_equal"] and snap["num_p"] == 1
        heap.free(b)
        if transport == "tcp":
            for op in ("shutdown", "release", "check"):
                assert "administrative" in _refused(d.endpoint, op)
            assert client.request(d.endpoint, "check", 30000, token=token)["problems"] == []
            assert d.proc.poll() is None
            # A flood of refusals writes a few lines, then one that says how many were not written.
            for _ in range(200):
                _refused(d.endpoint, "shutdown")
            assert d.log().count("request refused") <= 12, d.log()
        else:
            assert client.request(d.endpoint, "check", 30000)["problems"] == []
    assert d.proc.poll() is None


# --- no stop of the world on demand for free ----------------------------------------------------


def _dealer(endpoint):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def test_concurrent_snapshots_share_one_pause(start_daemon):
    d = start_daemon(extra=("--min-stop-interval-ms", "200"))
    with client.connect(d.endpoint):
        client.stats(d.endpoint)  # the next stop waits at least 200 ms: every request below with it
        socks = [_dealer(d.endpoint) for _ in range(20)]
        try:
            for i, s in enumerate(socks):
                s.send(protocol.encode_request("stats", i, deadline_ms=2000))
            epochs = set()
            for s in socks:
                assert s.poll(DEADLINE * 1000)
                epochs.add(protocol.decode_reply(s.recv(), op="stats")["snapshot"]["epoch"])
        finally:
            for s in socks:
                s.close(0)
        assert len(epochs) == 1, f"20 concurrent stats requests took {len(epochs)} pauses"


def test_a_snapshot_flood_gets_no_more_pauses_than_the_floor_allows(start_daemon):
    d = start_daemon(extra=("--min-stop-interval-ms", "50"))
    with client.connect(d.endpoint):
        e0 = client.ping(d.endpoint)["epoch"]
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            client.stats(d.endpoint, deadline_ms=1)
            n += 1
        elapsed = time.monotonic() - t0
        pauses = client.ping(d.endpoint)["epoch"] - e0
        assert pauses <= elapsed / 0.05 + 2, f"{n} requests, {pauses} pauses in {elapsed:.2f} s"


def test_long_deadlines_are_refused_or_capped(start_daemon):
    import mpworkers
    from test_daemon import SPAWN

    d = start_daemon(extra=("--park-deadline-ms", "300"))
    s = _dealer(d.endpoint)
    try:
        s.send(msgpack.packb({"v": 1, "id": 1, "op": "stats", "deadline_ms": 60000}))
        assert s.poll(DEADLINE * 1000)
        with pytest.raises(client.RemoteError) as e:
            protocol.decode_reply(s.recv())
        assert e.value.code == "BAD_ARGS"
    finally:
        s.close(0)
    ready, release, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    w = SPAWN.Process(target=mpworkers.stuck_worker, args=(d.endpoint, ready, release, out))
    w.start()
    try:
        assert ready.wait(DEADLINE)
        t = time.monotonic()
        snap = client.stats(d.endpoint, deadline_ms=10000)
        elapsed = time.monotonic() - t
        assert not snap["consistent"] and elapsed < 3, f"a stuck worker froze the world for {elapsed:.1f} s"
    finally:
        release.set()
    out.get(timeout=DEADLINE)
    w.join(DEADLINE)


# --- what a flood of refusals may cost: budgets and a tarpit ------------------------------------


def _refusals_line(log):
    """The counts of the daemon's last "refusals" line (written when it stops)."""
    lines = [line.partition(" refusals  ")[2] for line in log.splitlines() if " refusals  " in line]
    assert lines, log
    return {k: int(v) for k, v in (f.split("=") for f in lines[-1].split())}


def _replies(sock, n):
    """The next n replies on sock, decoded, as (id, error code or "OK")."""
    out = []
    for _ in range(n):
        assert sock.poll(DEADLINE * 1000), f"{len(out)} of {n} replies came"
        m = msgpack.unpackb(sock.recv(), raw=False)
        out.append((m["id"], "OK" if m["ok"] else m["error"]))
    return out


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_a_client_over_its_refusal_budget_is_answered_late_while_others_are_served(start_daemon, transport):
    # Three refusals answered at once, then a tarpit long enough that only the stop sends the rest.
    d = start_daemon(
        endpoint=f"tcp://127.0.0.1:{_free_port()}" if transport == "tcp" else None,
        extra=("--refusal-budget", "0", "3", "--tarpit-ms", "600000"),
    )
    hostile = _dealer(d.endpoint)
    try:
        with client.connect(d.endpoint) as heap:
            slot, pid = heap.slot, os.getpid()
            garbage = b"\xc1 not msgpack"
            for _ in range(3):  # the first decoded, the next two refused from the table
                hostile.send(garbage)
            hostile.send_multipart([b"a", b"b", b"c"])  # of no shape: dropped, counted
            for i in range(5):
                hostile.send(protocol.encode_request("heartbeat", i, slot=slot))
            hostile.send(protocol.encode_request("register", 5, pid=pid + 1, slot=slot))
            assert _replies(hostile, 3) == [(None, "BAD_FRAME")] * 3
            # Meanwhile: the worker allocates, a second one registers, an observer's snapshot
            # parks both -- none of them waits for the hostile client's refusals.
            b = heap.alloc(1000)
            with client.connect(d.endpoint) as second:
                snap = client.stats(d.endpoint)
                assert snap["consistent"] and snap["num_p"] == 2
                second.free(second.alloc(64))
            heap.free(b)
            assert client.ping(d.endpoint)["num_p"] == 1
            assert hostile.poll(0) == 0, "a refusal over the budget was answered at once"
        assert d.stop() == 0
        # The stop sent every held refusal, each the one it would have been, in order.
        late = _replies(hostile, 6)
        assert late == [(i, "FORBIDDEN") for i in range(5)] + [(5, "NOT_REGISTERED")], late
    finally:
        hostile.close(0)
    log = d.log()
    assert _refusals_line(log) == {"refused": 10, "early": 3, "held": 6, "dropped": 0, "waiting": 0}
    assert "refusals held" in log and log.count("P joined") == 2 and "P re-registered" not in log
    assert not os.path.exists(f"/dev/shm/{d.name}") and (
        transport == "tcp" or not os.path.exists(d.sock_path())
    )


def test_clients_that_change_identity_share_one_budget(start_daemon):
    # Every client its own fresh budget, but two refusals at once for everyone together.
    d = start_daemon(extra=("--global-refusal-budget", "0", "2", "--tarpit-ms", "600000"))
    socks = [_dealer(d.endpoint) for _ in range(3)]
    try:
        for i, s in enumerate(socks[:2]):
            s.send(protocol.encode_request("heartbeat", i, slot=0))
            assert _replies(s, 1) == [(i, "NOT_REGISTERED")]
        socks[2].send(protocol.encode_request("heartbeat", 2, slot=0))
        assert client.stats(d.endpoint)["consistent"]  # an observer is served meanwhile
        assert socks[2].poll(0) == 0
        assert d.stop() == 0
        assert _replies(socks[2], 1) == [(2, "NOT_REGISTERED")]  # sent by the stop
    finally:
        for s in socks:
            s.close(0)
    assert _refusals_line(d.log()) == {"refused": 3, "early": 0, "held": 1, "dropped": 0, "waiting": 0}


def test_snapshots_beyond_a_clients_budget_wait_for_the_next_pause(start_daemon):
    # One snapshot at will per client (a fresh socket: a fresh client), then none.
    d = start_daemon(extra=("--snapshot-budget", "0", "1", "--tarpit-ms", "600000"))
    s = _dealer(d.endpoint)
    try:
        s.send(protocol.encode_request("stats", 9))
        assert _replies(s, 1) == [(9, "OK")]
        for i in range(3):
            s.send(protocol.encode_request("stats", i))
        s.send(protocol.encode_request("ping", 3))
        assert _replies(s, 1) == [(3, "OK")]  # the three stats were read before it, and wait
        e0 = client.ping(d.endpoint)["epoch"]
        snap = client.stats(d.endpoint)  # an observer's: one pause, for all four
        assert snap["epoch"] == e0 + 1
        late = [protocol.decode_reply(s.recv(), op="stats") for _ in range(3) if s.poll(DEADLINE * 1000)]
        assert sorted(r["id"] for r in late) == [0, 1, 2]
        assert {r["snapshot"]["epoch"] for r in late} == {snap["epoch"]}
        assert client.ping(d.endpoint)["epoch"] == e0 + 1
    finally:
        s.close(0)


def test_a_snapshot_beyond_the_budget_gets_its_own_pause_after_the_tarpit(start_daemon):
    d = start_daemon(extra=("--snapshot-budget", "0", "0", "--tarpit-ms", "50"))
    s = _dealer(d.endpoint)
    try:
        s.send(protocol.encode_request("stats", 7))
        assert s.poll(DEADLINE * 1000), "a snapshot over the budget was never answered"
        assert protocol.decode_reply(s.recv(), op="stats")["snapshot"]["consistent"]
    finally:
        s.close(0)


# --- TCP is for observers; REQ observers --------------------------------------------------------


def test_a_non_loopback_tcp_bind_without_authentication_refuses_to_start(start_daemon):
    d = _start_refused(start_daemon, endpoint=f"tcp://0.0.0.0:{_free_port()}")
    assert "not a loopback address" in d.log() and "--insecure" in d.log(), d.log()
    d = start_daemon(endpoint=f"tcp://0.0.0.0:{_free_port()}", extra=("--insecure",))
    assert "without authentication" in d.log()
    endpoint = d.endpoint.replace("0.0.0.0", "127.0.0.1")
    assert client.ping(endpoint)["pid"] == 0
    d.endpoint = endpoint  # the fixture stops it by SIGTERM


def test_pids_are_hidden_over_tcp(start_daemon):
    d = start_daemon(endpoint=f"tcp://127.0.0.1:{_free_port()}")
    with client.connect(d.endpoint):
        info = client.ping(d.endpoint)
        snap = client.stats(d.endpoint)
        assert info["pid"] == 0 and info["num_p"] == 1
        assert snap["consistent"] and [p["pid"] for p in snap["per_p"]] == [0]


def test_a_req_observer_gets_its_reply(start_daemon):
    d = start_daemon()
    s = zmq.Context.instance().socket(zmq.REQ)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(d.endpoint)
    try:
        for i, op in enumerate(("ping", "stats", "ping")):
            s.send(protocol.encode_request(op, i))
            assert s.poll(10_000), f"no reply to {op} on a REQ socket"
            reply = protocol.decode_reply(s.recv(), op=op)
            assert reply["id"] == i
        assert reply["pid"] == d.proc.pid  # ipc: a trusted peer
    finally:
        s.close(0)


# --- a group let in with --socket-mode 0660 ---------------------------------------------------


@pytest.fixture
def group_member():
    """A throwaway group and a user whose primary group it is (groupadd, useradd)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a group and a user")
    if not all(shutil.which(c) for c in ("groupadd", "groupdel", "useradd", "userdel")):
        pytest.skip("groupadd/useradd not installed: cannot make a group member")
    name = f"shmg{uuid.uuid4().hex[:8]}"
    r = subprocess.run(["groupadd", name], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"groupadd failed: {r.stderr.strip()}")
    try:
        r = subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/bin/false", "-g", name, name],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            pytest.skip(f"useradd failed: {r.stderr.strip()}")
        try:
            yield pwd.getpwnam(name)
        finally:
            subprocess.run(["userdel", name], capture_output=True)
    finally:
        subprocess.run(["groupdel", name], capture_output=True)


def _work_as_a_worker(endpoint):
    with client.connect(endpoint, timeout_ms=5000) as heap:
        b = heap.alloc(1000)
        b.buf[:5] = b"hello"
        ok = bytes(heap.view(b.handle, 5)) == b"hello"
        heap.free(b)
        return ok and heap.stats()["consistent"]


def test_socket_mode_0660_lets_the_group_connect_and_allocate(group_member, other_user, tmp_path):
    """The daemon runs as root with the group's gid and --socket-mode 0660: a member of the group
    connects, maps the arena and allocates; a user outside the group gets neither the socket nor
    the segment."""
    from support import EXE, ROOT, wait_ping

    base = f"/tmp/shmalloc-grp-{uuid.uuid4().hex[:8]}"
    os.mkdir(base, 0o755)  # root's, traversable: the daemon makes the socket directory inside
    endpoint, name = f"ipc://{base}/sock/control.sock", unique_name("grp")
    gid = group_member.pw_gid
    with open(tmp_path / "daemon.log", "w") as log:  # the daemon keeps its own descriptor
        proc = subprocess.Popen(
            [
                *EXE,
                "daemon",
                "--endpoint",
                endpoint,
                "--max-heap",
                "64M",
                "--name",
                name,
                "--socket-mode",
                "0660",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            preexec_fn=lambda: os.setgid(gid),
        )
    try:
        assert wait_ping(endpoint, proc) is not None, (tmp_path / "daemon.log").read_text()
        st = os.stat(f"/dev/shm/{name}")
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660)
        assert as_user(group_member, _work_as_a_worker, endpoint) == ("ok", True)
        kind, what = as_user(other_user, _work_as_a_worker, endpoint)
        assert kind == "err" and ("Permission" in what or "Unavailable" in what), what
    finally:
        proc.terminate()
        assert proc.wait(DEADLINE) == 0, (tmp_path / "daemon.log").read_text()
        shutil.rmtree(base, ignore_errors=True)
    assert not os.path.exists(f"/dev/shm/{name}")
