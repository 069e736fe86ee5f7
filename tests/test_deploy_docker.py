"""The container (deploy/docker/): the Dockerfile's instructions, install.sh's syntax and
argument checks, compose.yaml's structure through `docker compose config` when a working
`docker compose` exists, else PyYAML when installed (it is not a dependency of the project),
else skipped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import support_deploy
from support_deploy import DOCKERFILE, INSTALL_SH, command_list, compose_config, ipc_path, option, parse_size

DOCKER_DEFAULT_SHM = 64 * 2**20  # a container's /dev/shm without --shm-size


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, rest = line.partition(" ")
            out.append((instr.upper(), rest.strip()))
    return out


def test_dockerfile():
    ins = dockerfile_instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = [rest for instr, rest in ins if instr == "RUN"]
    assert any("deploy/docker/install.sh" in r for r in runs), "the image must install with install.sh"

    users = [i for i, (instr, _) in enumerate(ins) if instr == "USER"]
    assert users, "the image must not run as root"
    last_user = ins[users[-1]][1].split(":")[0]
    assert last_user not in ("root", "0")
    entry = [i for i, (instr, _) in enumerate(ins) if instr == "ENTRYPOINT"]
    assert entry and users[-1] < entry[-1]

    assert json.loads(ins[entry[-1]][1]) == ["shmalloc", "daemon"]
    (cmd,) = [json.loads(rest) for instr, rest in ins if instr == "CMD"]
    assert option(cmd, "--endpoint") == "ipc:///run/shmalloc/control.sock"
    assert option(cmd, "--metrics-addr") == "0.0.0.0:9464"
    heap = option(cmd, "--max-heap")
    if heap is not None:
        assert parse_size(heap) < DOCKER_DEFAULT_SHM, "the default command must fit Docker's default /dev/shm"
    exposed = [w for instr, rest in ins if instr == "EXPOSE" for w in rest.split()]
    assert "9464" in exposed


def test_install_script_syntax_and_usage(tmp_path):
    r = subprocess.run(["sh", "-n", str(INSTALL_SH)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    if shutil.which("shellcheck"):
        r = subprocess.run(["shellcheck", str(INSTALL_SH)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout
    # Not a source tree: refused before pip is called (PYTHON would fail).
    r = subprocess.run(
        ["sh", str(INSTALL_SH), str(tmp_path), "/nonexistent/python"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "pyproject.toml" in r.stderr, r.stderr
    r = subprocess.run(["sh", str(INSTALL_SH)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


def mounts(service: dict) -> dict[str, str]:
    """{target: named volume} for a service's volume mounts, short or long syntax."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
            if not source.startswith((".", "/", "~")):
                out[target] = source
        elif v.get("type", "volume") == "volume":
            out[v["target"]] = v["source"]
    return out


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_structure():
    cfg = compose_config()
    services = cfg["services"]
    daemon = services["daemon"]
    workers = {name: s for name, s in services.items() if name != "daemon"}
    assert len(workers) >= 2

    # The daemon owns the IPC namespace, hence /dev/shm, and sizes it.
    assert daemon["ipc"] == "shareable"
    assert "shm_size" in daemon, "Docker's default /dev/shm is 64 MiB"
    cmd = command_list(daemon["command"])
    assert parse_size(option(cmd, "--max-heap")) < parse_size(daemon["shm_size"]), (
        "--max-heap must fit in the daemon's /dev/shm"
    )
    endpoint = option(cmd, "--endpoint")
    sock_dir = str(ipc_path(endpoint).parent)
    volume = mounts(daemon).get(sock_dir)
    assert volume, f"{sock_dir} (socket directory) must be a named volume"
    assert volume in (cfg.get("volumes") or {})

    for name, w in workers.items():
        assert w["ipc"] == "service:daemon", f"{name} must share the daemon's /dev/shm"
        assert w.get("pid") == "service:daemon", f"{name}: the daemon checks worker pids"
        assert "shm_size" not in w, f"{name}: shm_size on a joining container has no effect"
        assert mounts(w).get(sock_dir) == volume, f"{name} must mount the socket volume at {sock_dir}"
        assert environment(w).get("SHMALLOC_ENDPOINT") == endpoint, name
        entry = command_list(w.get("entrypoint") or [])
        assert entry and Path(entry[0]).name in INSTALL_SH.read_text(), f"{name}: {entry} is not installed"
        assert "daemon" in (w.get("depends_on") or {}), name


@pytest.mark.parametrize(
    "service, key, bad",
    [
        ("worker", "ipc", "private"),
        ("worker", "pid", None),
        ("daemon", "shm_size", "64m"),
        ("worker", "volumes", []),
    ],
)
def test_compose_structure_check_can_fail(service, key, bad):
    """The structure test catches each broken variant of the real file."""
    cfg = json.loads(json.dumps(compose_config()))
    name = service if service == "daemon" else next(n for n in cfg["services"] if n != "daemon")
    cfg["services"][name][key] = bad
    saved, support_deploy._compose_cache = support_deploy._compose_cache, cfg
    try:
        with pytest.raises(AssertionError):
            test_compose_structure()
    finally:
        support_deploy._compose_cache = saved
