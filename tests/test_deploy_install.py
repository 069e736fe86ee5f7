"""Install (skipped only with SHMALLOC_SKIP_INSTALL_TESTS=1, e.g. offline): install.sh into a
fresh venv -- the Dockerfile's own steps -- then the installed daemon and demo worker end to
end.  It is what caught a package missing from the wheel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from support_deploy import INSTALL_SH, ROOT

installs = pytest.mark.skipif(
    os.environ.get("SHMALLOC_SKIP_INSTALL_TESTS") == "1",
    reason="SHMALLOC_SKIP_INSTALL_TESTS=1: no install from the package index into a fresh venv",
)


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A fresh venv with the repository installed by deploy/docker/install.sh."""
    if not (ROOT / "pyproject.toml").exists():
        pytest.fail("pyproject.toml missing: nothing to install")
    path = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    r = subprocess.run(
        ["sh", str(INSTALL_SH), str(ROOT), str(path / "bin" / "python")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return path


@pytest.mark.slow
@installs
def test_install_script_into_fresh_venv(venv):
    for exe in ("shmalloc", "shmalloc-demo-worker"):
        r = subprocess.run([str(venv / "bin" / exe), "--help"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{exe} --help: {r.stderr}"
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import client, prometheus_client"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=venv,  # not the repository: the installed package, not the sources
    )
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@installs
def test_installed_daemon_and_demo_worker(venv, tmp_path):
    """The installed daemon serves the installed demo worker, and SIGTERM leaves nothing behind."""
    name = f"shmalloc-deploytest-{os.getpid()}"
    sock = tmp_path / "control.sock"
    endpoint = f"ipc://{sock}"
    env = {**os.environ, "SHMALLOC_ENDPOINT": endpoint}
    daemon = subprocess.Popen(
        [
            str(venv / "bin" / "shmalloc"),
            "daemon",
            "--endpoint",
            endpoint,
            "--name",
            name,
            "--max-heap",
            "64M",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert daemon.poll() is None, daemon.stdout.read()
            assert time.monotonic() < deadline, "daemon did not create its socket"
            time.sleep(0.05)
        r = subprocess.run(
            [str(venv / "bin" / "shmalloc-demo-worker"), "--rounds", "2", "--interval", "0"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        lines = [json.loads(line) for line in r.stdout.splitlines()]
        assert [line["round"] for line in lines] == [0, 1]
        assert all(line["heap_objects"] >= 3 for line in lines)
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
        try:
            out, _ = daemon.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            out, _ = daemon.communicate()
    assert daemon.returncode == 0, out
    assert not sock.exists(), "socket left behind"
    leftovers = [p for p in os.listdir("/dev/shm") if name in p]
    assert leftovers == [], f"arena left behind: {leftovers}"
