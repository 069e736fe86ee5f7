"""Fixtures that track every process, socket file and /dev/shm segment a test makes, and fail
the test on anything left over.  The helpers they use, and that tests import, are in support.py."""

import os
import signal
import subprocess

import pytest
from support import EXE, ROOT, Daemon, child_pids, shm_names, unique_name, wait_ping

from shm import Arena


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


@pytest.fixture
def start_daemon(tmp_path):
    """Start `shmalloc daemon` as the README does; at teardown SIGTERM it and require a clean
    exit: code 0, no socket file, no segment."""
    made = []

    def start(endpoint=None, name=None, extra=(), expect_up=True, curve=None):
        endpoint = endpoint or f"ipc://{tmp_path}/control.sock"
        name = name or unique_name("d")
        logpath = tmp_path / f"daemon-{len(made)}.log"
        with open(logpath, "w") as log:
            proc = subprocess.Popen(
                [*EXE, "daemon", "--endpoint", endpoint, "--max-heap", "128M", "--name", name, *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        d = Daemon(proc, endpoint, name, logpath)
        made.append(d)
        up = wait_ping(endpoint, proc, curve)
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
