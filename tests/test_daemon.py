"""The real daemon, started as the README does, with real worker processes over a real ZeroMQ
socket: consistent snapshots under load, SIGKILL, a stuck worker, garbage on the socket,
a second daemon, a killed daemon's arena adopted (a stopped one's: tests/test_stop.py)."""

import json
import multiprocessing as mp
import os
import signal
import subprocess
import time

import mpworkers
import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import DEADLINE, EXE, ROOT

import client
from client import protocol
from service.demo import client_worker, drain
from shm import stats

SPAWN = mp.get_context("spawn")


def start_workers(d, n, min_ops=200, progress=True):
    until = SPAWN.Event()
    boxes = [SPAWN.Queue() for _ in range(n)]
    results = SPAWN.Queue()
    events = [SPAWN.Event() for _ in range(n)]
    procs = [
        SPAWN.Process(
            target=client_worker,
            args=(
                d.endpoint,
                i,
                min_ops,
                500 + i,
                boxes[i],
                boxes[(i + 1) % n],
                results,
                events[i],
                min_ops // 2,
                until,
            ),
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    if progress:
        for e in events:
            assert e.wait(DEADLINE), "a worker made no progress"
    return procs, boxes, results, until


def finish_workers(d, procs, boxes, results, until, alive=None):
    until.set()
    alive = procs if alive is None else alive
    res = [results.get(timeout=DEADLINE) for _ in alive]
    for p in alive:
        p.join(DEADLINE)
        assert p.exitcode == 0, f"worker exit {p.exitcode}"
    with client.connect(d.endpoint) as heap:
        for box in boxes:
            drain(box, heap)
    return res


def run_cli(*args, timeout=60):
    return subprocess.run([*EXE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def observe(endpoint, n, slow=True):
    q = SPAWN.Queue()
    p = SPAWN.Process(target=mpworkers.observer, args=(endpoint, n, q, slow))
    p.start()
    out = q.get(timeout=DEADLINE * 3)
    p.join(DEADLINE)
    assert p.exitcode == 0
    return out


@pytest.mark.slow
def test_200_snapshots_while_four_workers_run(start_daemon):
    d = start_daemon()
    procs, boxes, results, until = start_workers(d, 4)
    seen = observe(d.endpoint, 200)
    res = finish_workers(d, procs, boxes, results, until)
    assert seen["problems"] == []
    assert seen["num_p"] == [4], "every snapshot should have parked the 4 running workers"
    assert sum(r["received"] for r in res) > 0, "no block crossed processes"
    final = client.stats(d.endpoint, slow=True)
    assert final["consistent"] and final["slow_equal"] and stats.identities(final) == []
    assert final["heap_objects"] == 0 and final["mallocs"] == final["frees"] >= sum(r["mallocs"] for r in res)
    assert final["mallocs"] >= seen["mallocs"]
    r = run_cli("check", "--endpoint", d.endpoint)
    assert r.returncode == 0 and "check: OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_sigkill_a_worker_mid_workload(start_daemon):
    d = start_daemon()
    procs, boxes, results, until = start_workers(d, 4)
    victim = procs[2]
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    seen = observe(d.endpoint, 20)
    assert seen["problems"] == []
    assert seen["num_p"] == [3], "the dead P should be reclaimed before the first snapshot reads anything"
    finish_workers(d, procs, boxes, results, until, alive=[p for p in procs if p is not victim])
    assert "P reclaimed" in d.log()
    r = run_cli("check", "--endpoint", d.endpoint)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dead_worker_is_reclaimed_without_a_snapshot(start_daemon):
    d = start_daemon()
    cmds, res = SPAWN.Queue(), SPAWN.Queue()
    w = SPAWN.Process(target=mpworkers.connected_worker, args=(d.endpoint, cmds, res))
    w.start()
    kind, slot = res.get(timeout=DEADLINE)
    cmds.put(("alloc", 64))
    assert res.get(timeout=DEADLINE)[0] == "ok"
    os.kill(w.pid, signal.SIGKILL)
    w.join(DEADLINE)
    deadline = time.monotonic() + 30
    while "P reclaimed" not in d.log():  # the liveness scan runs every 0.1 s
        assert time.monotonic() < deadline, "dead P not reclaimed"
        time.sleep(0.05)
    snap = client.stats(d.endpoint, slow=True)
    assert snap["num_p"] == 0 and snap["heap_objects"] == 1 and snap["slow_equal"]


def test_stuck_worker_makes_the_snapshot_say_so(start_daemon):
    d = start_daemon()
    ready, release, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    w = SPAWN.Process(target=mpworkers.stuck_worker, args=(d.endpoint, ready, release, out))
    w.start()
    try:
        assert ready.wait(DEADLINE)
        t = time.monotonic()
        snap = client.stats(d.endpoint, deadline_ms=300)
        elapsed = time.monotonic() - t
        assert snap["consistent"] is False
        assert len(snap["unflushed"]) == 1
        assert [p["state"] for p in snap["per_p"]] == ["late"]
        assert elapsed < 10, f"a stats call with a 300 ms deadline took {elapsed:.1f} s"
        assert "did not park" in d.log()
    finally:
        release.set()
    slot = out.get(timeout=DEADLINE)
    w.join(DEADLINE)
    assert w.exitcode == 0 and snap["unflushed"] == [slot]
    snap = client.stats(d.endpoint, slow=True)
    assert snap["consistent"] and snap["slow_equal"]


def _raw_socket(endpoint):
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _send_and_judge(sock, frames):
    """Send one message; the daemon must answer with a well-formed error, or drop it."""
    sock.send_multipart(frames)
    if sock.poll(2000):
        reply = msgpack.unpackb(sock.recv(), raw=False)
        assert (
            reply["v"] == 1 and reply["ok"] is False and isinstance(reply["error"], str) and reply["message"]
        )
        return reply["error"]
    return None


GARBAGE = [
    [b""],
    [b"\xc1"],
    [b"not msgpack at all"],
    [msgpack.packb({"v": 1, "id": 1, "op": "stats"})[:-3]],
    [msgpack.packb([1, 2, 3])],
    [msgpack.packb({"v": 2, "id": 1, "op": "ping"})],
    [msgpack.packb({"v": 1, "id": 1, "op": "format_disk"})],
    [msgpack.packb({"v": 1, "id": 1, "op": "stats", "deadline_ms": "soon"})],
    [msgpack.packb({"v": 1, "id": 1, "op": "stats", "deadline_ms": 10**12})],
    [msgpack.packb({"v": 1, "id": 1, "op": "register", "pid": True})],
    [msgpack.packb({"v": 1, "id": 1, "op": "unregister", "slot": 10**6})],
    [msgpack.packb({"v": 1, "id": [1] * 100, "op": "ping"})],
    [msgpack.packb({"v": 1, "id": 1, "op": "ping", "x": "y" * 100_000})],
    [b"\x00" * 200_000],
    [msgpack.packb({"v": 1, "id": 1, "op": "ping"}), b"extra frame"],
    [msgpack.packb({"v": 1, "id": 1, "op": "heartbeat", "slot": 5})],
]


def _figures(snap):
    return {k: snap[k] for k in stats.FIELD_NAMES} | {"by_size": snap["by_size"]}


@pytest.mark.slow
def test_garbage_on_the_control_socket(start_daemon):
    d = start_daemon(extra=("--retain", "100%"))  # only requests change the heap: no background release
    with client.connect(d.endpoint) as heap:
        keep = [heap.alloc(s) for s in (10, 5000, 70_000)]
        before = client.stats(d.endpoint)
        sock = _raw_socket(d.endpoint)
        codes = []
        try:
            for frames in GARBAGE:
                codes.append(_send_and_judge(sock, frames))
        finally:
            sock.close(0)
        assert {"BAD_FRAME", "BAD_VERSION", "UNKNOWN_OP", "BAD_ARGS", "BAD_REQUEST", "TOO_LARGE"} <= set(
            codes
        ), codes
        assert client.ping(d.endpoint)["pid"] == d.proc.pid
        after = client.stats(d.endpoint)
        assert _figures(after) == _figures(before), "garbage changed the heap"
        for b in keep:
            assert bytes(b.buf) == bytes(heap.view(b.handle, b.size))
            heap.free(b)


@st.composite
def garbage_frames(draw):
    kind = draw(st.sampled_from(["bytes", "map", "envelope"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    leaf = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70).filter(lambda i: -(2**63) <= i < 2**64),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.binary(max_size=20),
    )
    tree = st.recursive(
        leaf,
        lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=8), ch, max_size=4),
        max_leaves=12,
    )
    if kind == "map":
        return msgpack.packb(draw(tree))
    env = {
        "v": draw(st.sampled_from([1, 1, 2, "1", None])),
        "id": draw(st.one_of(st.integers(0, 10), st.text(max_size=5))),
        "op": draw(st.sampled_from(sorted(protocol.OPS)) | st.text(max_size=10)),
    }
    env.update(
        draw(
            st.dictionaries(st.sampled_from(["pid", "slot", "deadline_ms", "slow", "zzz"]), tree, max_size=3)
        )
    )
    if env["op"] in (
        "shutdown",
        "release",
        "check",
        "register",
        "unregister",
    ):  # keep the daemon and its slots
        env["op"] = "ping" if draw(st.booleans()) else "nope"
        env["zzz"] = 1  # ...and make them invalid anyway
    return msgpack.packb(env)


@pytest.mark.slow
def test_hypothesis_garbage_never_kills_the_daemon(start_daemon):
    d = start_daemon()
    sock = _raw_socket(d.endpoint)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(garbage_frames())
    def one(frame):
        sock.send(frame)
        if sock.poll(2000):
            reply = msgpack.unpackb(sock.recv(), raw=False)
            assert reply["v"] == 1 and isinstance(reply["ok"], bool)
            if not reply["ok"]:
                assert isinstance(reply["error"], str) and isinstance(reply["message"], str)

    try:
        one()
    finally:
        sock.close(0)
    assert client.ping(d.endpoint)["pid"] == d.proc.pid
    snap = client.stats(d.endpoint, slow=True)
    assert snap["consistent"] and snap["slow_equal"] and snap["mallocs"] == 0


def test_second_daemon_on_a_live_endpoint_refuses(start_daemon):
    d = start_daemon()
    second = start_daemon(endpoint=d.endpoint, expect_up=False)
    assert second.proc.wait(DEADLINE) == 2
    assert "another shmalloc daemon" in second.log()
    assert client.ping(d.endpoint)["pid"] == d.proc.pid


def test_max_heap_larger_than_dev_shm_is_refused(start_daemon):
    d = start_daemon(extra=("--max-heap", "1000T"), expect_up=False)
    assert d.proc.wait(DEADLINE) == 2
    assert "/dev/shm" in d.log() and not os.path.exists(f"/dev/shm/{d.name}")


@pytest.mark.slow
def test_killed_daemon_arena_is_adopted_and_workers_reregister(start_daemon):
    d = start_daemon()
    cmds, res = SPAWN.Queue(), SPAWN.Queue()
    w = SPAWN.Process(target=mpworkers.connected_worker, args=(d.endpoint, cmds, res))
    w.start()
    assert res.get(timeout=DEADLINE)[0] == "slot"
    handles = []
    for size in (64, 64, 5000, 100_000):
        cmds.put(("alloc", size))
        kind, h = res.get(timeout=DEADLINE)
        assert kind == "ok"
        handles.append(h)
    d.stop(signal.SIGKILL)
    # No daemon: the worker goes on, slow paths included.
    for size in (64, 200_000):
        cmds.put(("alloc", size))
        kind, h = res.get(timeout=DEADLINE)
        assert kind == "ok", h
        handles.append(h)
    cmds.put(("free", handles.pop(0)))
    assert res.get(timeout=DEADLINE)[0] == "ok"
    assert os.path.exists(d.sock_path()) and os.path.exists(f"/dev/shm/{d.name}")
    d2 = start_daemon(endpoint=d.endpoint, name=d.name)
    assert "adopted arena" in d2.log() and "removed stale socket" in d2.log()
    deadline = time.monotonic() + 30
    while True:  # the worker's control thread re-registers with its next heartbeat
        snap = client.stats(d2.endpoint, deadline_ms=500, slow=True)
        if snap["consistent"]:
            break
        assert time.monotonic() < deadline, f"worker never re-registered: {snap['unflushed']}"
    assert snap["num_p"] == 1 and snap["slow_equal"] and stats.identities(snap) == []
    assert snap["heap_objects"] == len(handles)
    for h in handles:
        cmds.put(("free", h))
        assert res.get(timeout=DEADLINE)[0] == "ok"
    cmds.put(("close",))
    assert res.get(timeout=DEADLINE) == ("ok", None)
    w.join(DEADLINE)
    snap = client.stats(d2.endpoint, slow=True)
    assert snap["heap_objects"] == 0 and snap["slow_equal"]
    r = run_cli("check", "--endpoint", d2.endpoint)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cli_stats_table_and_json(start_daemon):
    d = start_daemon()
    with client.connect(d.endpoint) as heap:
        blocks = [heap.alloc(s) for s in (1, 100, 4000, 50_000)]
        r = run_cli("stats", "--endpoint", d.endpoint, "--json", "--slow")
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["consistent"] and snap["slow_equal"] and stats.identities(snap) == []
        assert snap["heap_objects"] == 4 and snap["num_p"] == 1 and snap["large_mallocs"] == 1
        r = run_cli("stats", "--endpoint", d.endpoint)
        assert r.returncode == 0
        assert "identities: all hold" in r.stdout and "heap_alloc" in r.stdout and "MiB" in r.stdout
        for b in blocks:
            heap.free(b)


def test_cli_without_a_daemon_says_so(tmp_path):
    r = run_cli("stats", "--endpoint", f"ipc://{tmp_path}/nobody.sock")
    assert r.returncode == 2 and "no daemon at" in r.stderr and "nobody.sock" in r.stderr


def test_cli_check_exits_1_and_names_a_broken_structure(start_daemon):
    d = start_daemon()
    from shm import Arena
    from shm import layout as L

    with client.connect(d.endpoint) as heap:
        b = heap.alloc(64)
        r = run_cli("check", "--endpoint", d.endpoint)
        assert r.returncode == 0, r.stdout + r.stderr
        spy = Arena.attach(d.name)  # corrupt one byte, as a wild write would
        off = spy.lay.amap_byte(b.handle) + 1
        spy.mv[off] = L.ALLOC
        try:
            r = run_cli("check", "--endpoint", d.endpoint)
            assert r.returncode == 1 and "allocation map" in r.stdout, r.stdout + r.stderr
        finally:
            spy.mv[off] = 0
            spy.close()
        assert run_cli("check", "--endpoint", d.endpoint).returncode == 0
        heap.free(b)


def test_shutdown_request_stops_cleanly(start_daemon):
    d = start_daemon()
    client.request(d.endpoint, "shutdown")
    assert d.proc.wait(DEADLINE) == 0
    assert not os.path.exists(d.sock_path()) and not os.path.exists(f"/dev/shm/{d.name}")


def test_tcp_endpoint_on_loopback(start_daemon):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = start_daemon(endpoint=f"tcp://127.0.0.1:{port}")
    with client.connect(d.endpoint) as heap:
        b = heap.alloc(5000)
        snap = heap.stats(slow=True)
        assert snap["consistent"] and snap["slow_equal"] and snap["heap_objects"] == 1
        heap.free(b)


def test_release_and_cleanup_commands(start_daemon):
    d = start_daemon(extra=("--retain", "100%"))  # the background scavenger keeps every idle page
    with client.connect(d.endpoint) as heap:
        heap.free(heap.alloc(4 << 20))
    r = run_cli("release", "--endpoint", d.endpoint)
    assert r.returncode == 0 and json.loads(r.stdout)["released_bytes"] > 0, r.stdout + r.stderr
    snap = client.stats(d.endpoint)
    assert snap["heap_released"] > 0 and stats.identities(snap) == []
    r = run_cli("cleanup", "--endpoint", d.endpoint, "--name", d.name)
    assert r.returncode == 1 and "is serving" in r.stderr  # a live daemon keeps its arena
    d.stop(signal.SIGKILL)
    assert os.path.exists(f"/dev/shm/{d.name}")
    r = run_cli("cleanup", "--endpoint", d.endpoint, "--name", d.name)
    assert r.returncode == 0 and d.name in r.stdout
    assert not os.path.exists(f"/dev/shm/{d.name}") and not os.path.exists(d.sock_path())


def test_bad_metrics_addr_refuses_and_leaves_nothing(start_daemon):
    d = start_daemon(extra=("--metrics-addr", "no-port-here"), expect_up=False)
    assert d.proc.wait(DEADLINE) == 2
    assert "HOST:PORT" in d.log()
    assert not os.path.exists(d.sock_path()) and not os.path.exists(f"/dev/shm/{d.name}")


@pytest.mark.slow
def test_the_readme_demo_runs(tmp_path):
    """The README's first command ends in `shmalloc demo`: it must run, say so, and leave
    nothing behind."""

    def demo_segments():  # not the segments of test suites running beside this one (shmalloc-test-*)
        return {
            n
            for n in os.listdir("/dev/shm")
            if n.startswith("shmalloc-") and not n.startswith("shmalloc-test-")
        }

    before = demo_segments()
    r = subprocess.run(
        [*EXE, "demo", "--workers", "3", "--ops", "600"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert demo_segments() <= before, "the demo left its arena"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "every one consistent" in r.stdout and "identities: all hold" in r.stdout
    assert "slow span walk: equal" in r.stdout and "check: OK" in r.stdout
    assert "daemon stopped (exit 0)" in r.stdout


@pytest.mark.slow
def test_a_worker_connecting_during_a_pause_registers_and_waits_for_the_resume(start_daemon):
    """A P that claims its slot while the world is stopped starts stopped; its registration is
    served during the pause; its first allocation waits for the resume; nothing is late but the
    P that really is stuck."""
    import threading

    from shm import Arena
    from shm import layout as L

    d = start_daemon(extra=("--park-deadline-ms", "5000"))
    ready, release, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    stuck = SPAWN.Process(target=mpworkers.stuck_worker, args=(d.endpoint, ready, release, out))
    stuck.start()
    spy = Arena.attach(d.name)
    try:
        assert ready.wait(DEADLINE)
        got = {}
        t = threading.Thread(target=lambda: got.update(snap=client.stats(d.endpoint, deadline_ms=5000)))
        t.start()
        end = time.monotonic() + DEADLINE
        while not spy.q[L.HDR["stopped_epoch"]]:
            assert time.monotonic() < end and t.is_alive(), "the pause never began"
            time.sleep(0.001)
        cmds, res = SPAWN.Queue(), SPAWN.Queue()
        w = SPAWN.Process(target=mpworkers.connected_worker, args=(d.endpoint, cmds, res))
        w.start()
        kind, new_slot = res.get(timeout=DEADLINE)  # registered, whether or not the pause is over
        assert kind == "slot"
        cmds.put(("alloc", 100))
        assert res.get(timeout=DEADLINE)[0] == "ok"
        t.join(DEADLINE)
        snap = got["snap"]
        assert snap["consistent"] is False and new_slot not in snap["unflushed"]
        assert len(snap["unflushed"]) == 1
    finally:
        release.set()
        spy.close()
    stuck_slot = out.get(timeout=DEADLINE)
    stuck.join(DEADLINE)
    assert snap["unflushed"] == [stuck_slot]
    snap = client.stats(d.endpoint, slow=True)
    assert snap["consistent"] and snap["slow_equal"] and snap["num_p"] == 1 and snap["heap_objects"] == 1
    cmds.put(("close",))
    assert res.get(timeout=DEADLINE) == ("ok", None)
    w.join(DEADLINE)


def test_daemon_killed_mid_pause_parked_workers_go_on(start_daemon):
    """The daemon dies while the world is stopped: the kernel drops its resume lock, the parked
    P wakes, sees the daemon gone, and goes on allocating without it."""
    from shm import Arena
    from shm import layout as L

    d = start_daemon(extra=("--park-deadline-ms", "30000"))
    ready, release, out = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    stuck = SPAWN.Process(target=mpworkers.stuck_worker, args=(d.endpoint, ready, release, out))
    stuck.start()
    cmds, res = SPAWN.Queue(), SPAWN.Queue()
    w = SPAWN.Process(target=mpworkers.connected_worker, args=(d.endpoint, cmds, res))
    w.start()
    spy = Arena.attach(d.name)
    try:
        kind, slot = res.get(timeout=DEADLINE)
        cmds.put(("alloc", 64))
        assert res.get(timeout=DEADLINE)[0] == "ok"
        assert ready.wait(DEADLINE)
        asker = subprocess.Popen(
            [*EXE, "stats", "--endpoint", d.endpoint, "--deadline-ms", "10000"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + DEADLINE
        sw = spy.lay.slot_word(slot)
        while spy.q[sw + L.SLOT["stop"]] != L.STOP_PARK or not spy.q[L.HDR["stopped_epoch"]]:
            assert time.monotonic() < end, "the idle worker was never stopped"
            time.sleep(0.005)
        cmds.put(("alloc", 64))  # the world is stopped: this call parks on the resume lock
        while spy.q[sw + L.SLOT["parked"]] != spy.q[L.HDR["stopped_epoch"]]:
            assert time.monotonic() < end, "the idle worker's call never parked"
            time.sleep(0.005)
        d.stop(signal.SIGKILL)  # mid-pause: the worker is asleep on the resume lock
        asker.kill()  # its question will never be answered
        asker.wait(DEADLINE)
        assert res.get(timeout=DEADLINE)[0] == "ok"  # the parked call woke and went on without the daemon
        cmds.put(("alloc", 64))
        assert res.get(timeout=DEADLINE)[0] == "ok"
        cmds.put(("close",))
        assert res.get(timeout=DEADLINE) == ("ok", None)
        w.join(DEADLINE)
        assert w.exitcode == 0
    finally:
        release.set()
        spy.close()
    out.get(timeout=DEADLINE)
    stuck.join(DEADLINE)
    from shm.arena import unlink_segment

    unlink_segment(d.name)  # what `shmalloc cleanup` does after a killed daemon
    os.unlink(d.sock_path())


def test_heartbeat_for_a_slot_held_by_another_pid_is_refused(start_daemon):
    d = start_daemon()
    with client.connect(d.endpoint) as heap:
        with pytest.raises(client.RemoteError) as e:
            client.request(d.endpoint, "heartbeat", slot=heap.slot, pid=os.getpid() + 1)
        assert e.value.code == "NOT_REGISTERED"
        with pytest.raises(client.RemoteError) as e:
            client.request(d.endpoint, "heartbeat", slot=heap.slot, pid=os.getpid())
        assert e.value.code == "FORBIDDEN"
        token = heap.arena.registry.token(heap.slot)
        assert (
            client.request(d.endpoint, "heartbeat", slot=heap.slot, pid=os.getpid(), token=token)["epoch"]
            >= 0
        )
        # the probe above re-bound the slot to a throwaway socket; the real control thread
        # takes it back with its next heartbeat -- until then its P parks by its stop byte
        b = heap.alloc(10)
        heap.free(b)
