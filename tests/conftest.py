"""Fixtures that track every process, socket file and /dev/shm segment a test makes, and fail
the test on anything left over."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import client  # noqa: E402
from shm import Arena  # noqa: E402


# Every segment a test makes carries this session's prefix, so that two suites running at once
# never blame (or delete) each other's segments.
SESSION = uuid.uuid4().hex[:6]
PREFIX = f"shmalloc-test-{SESSION}-"


def shm_names():
    try:
        return {n for n in os.listdir("/dev/shm") if n.startswith(PREFIX)}
    except FileNotFoundError:
        return set()


def _helpers():
    """multiprocessing's own long-lived helper processes (resource tracker, forkserver)."""
    pids = set()
    from multiprocessing import forkserver, resource_tracker
    for obj in (resource_tracker._resource_tracker, forkserver._forkserver):
        pid = getattr(obj, "_pid", None) or getattr(obj, "_forkserver_pid", None)
        if pid:
            pids.add(pid)
    return pids


def child_pids():
    """Live (non-zombie) direct children of this process, from /proc, less multiprocessing's
    own helpers."""
    me, out = os.getpid(), set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        rest = st[st.rindex(")") + 2:].split()
        if int(rest[1]) == me and rest[0] != "Z":
            out.add(int(d))
    return out - _helpers()


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """Every test: no new /dev/shm segment, no child process left behind."""
    shm_before = shm_names()
    kids_before = child_pids()
    yield
    leaked_shm = shm_names() - shm_before
    leaked_kids = child_pids() - kids_before
    for pid in leaked_kids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
    for name in leaked_shm:
        try:
            os.unlink("/dev/shm/" + name)
        except FileNotFoundError:
            pass
    problems = []
    if leaked_shm:
        problems.append(f"/dev/shm segments left behind: {sorted(leaked_shm)}")
    if leaked_kids:
        problems.append(f"child processes left running: {sorted(leaked_kids)}")
    if problems:
        pytest.fail("; ".join(problems))


def unique_name(tag="t"):
    return f"{PREFIX}{tag}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_arena():
    made = []

    def make(heap_max=32 << 20, nslots=16, name=None):
        a = Arena.create(name or unique_name(), heap_max, nslots)
        made.append(a)
        return a

    yield make
    for a in made:
        a.destroy()


@pytest.fixture
def arena(make_arena):
    return make_arena()


from service.demo import pattern  # noqa: E402 - the one pattern, shared with the demo

__all__ = ["pattern"]

# --- the real daemon ---------------------------------------------------------------------------
DEADLINE = 120  # seconds: only turns a hang into a failure
EXE = [shutil.which("shmalloc")] if shutil.which("shmalloc") else [sys.executable, "-m", "service"]


class Daemon:
    def __init__(self, proc, endpoint, name, logpath):
        self.proc, self.endpoint, self.name, self.logpath = proc, endpoint, name, logpath

    def log(self):
        with open(self.logpath) as f:
            return f.read()

    def sock_path(self):
        return self.endpoint[len("ipc://"):]

    def stop(self, sig=signal.SIGTERM):
        self.proc.send_signal(sig)
        return self.proc.wait(DEADLINE)


def wait_ping(endpoint, proc):
    deadline = time.monotonic() + 30
    while True:
        try:
            return client.ping(endpoint, 200)
        except client.DaemonUnavailable:
            if proc.poll() is not None:
                return None
            assert time.monotonic() < deadline, "daemon did not answer within 30 s"


@pytest.fixture
def start_daemon(tmp_path):
    """Start `shmalloc daemon` as the README does; at teardown SIGTERM it and require a clean
    exit: code 0, no socket file, no segment."""
    made = []

    def start(endpoint=None, name=None, extra=(), expect_up=True):
        endpoint = endpoint or f"ipc://{tmp_path}/control.sock"
        name = name or unique_name("d")
        logpath = tmp_path / f"daemon-{len(made)}.log"
        with open(logpath, "w") as log:
            proc = subprocess.Popen([*EXE, "daemon", "--endpoint", endpoint, "--max-heap", "128M", "--name", name,
                                     *extra], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        d = Daemon(proc, endpoint, name, logpath)
        made.append(d)
        up = wait_ping(endpoint, proc)
        if expect_up:
            assert up is not None, f"daemon exited {proc.returncode}: {d.log()}"
        return d

    yield start
    for d in made:
        if d.proc.poll() is None:
            code = d.stop()
            assert code == 0, f"daemon exit code {code} after SIGTERM: {d.log()}"
            assert not os.path.exists(d.sock_path()), "socket file left after SIGTERM"
            assert not os.path.exists(f"/dev/shm/{d.name}"), "arena left in /dev/shm after SIGTERM"




def metadata_bytes(arena):
    """Everything of the arena but the heap pages and the dead bytes of the undo logs (an
    empty log keeps its last entries' bytes): a heap 'unchanged' check compares these."""
    from shm import layout as L
    lay, mv = arena.lay, arena.mv
    parts = [bytes(mv[:lay.slots_off])]
    control = [L.SLOT[n] for n in ("stop", "parked", "heartbeat_ns", "active_ns")]  # P control, not heap state
    for k in range(lay.nslots + 2):
        w = lay.slot_word(k)
        words = list(arena.q[w:w + L.SLOT_HEAD_WORDS])
        for i in control:
            words[i] = 0
        parts.append(repr(words).encode())
    parts.append(bytes(mv[lay.spans_off:lay.heap_off]))
    return b"".join(parts)
