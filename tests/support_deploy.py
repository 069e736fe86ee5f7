"""Helpers for the tests of the deployment files under deploy/ (tests/test_deploy_*.py): where
the files are, and readers for systemd units, command lines and compose.yaml."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


DEPLOY = ROOT / "deploy"


SYSTEMD = DEPLOY / "systemd"


DOCKER = DEPLOY / "docker"


DAEMON_UNIT = SYSTEMD / "shmalloc.service"


WORKER_UNIT = SYSTEMD / "shmalloc-worker@.service"


COMPOSE = DOCKER / "compose.yaml"


DOCKERFILE = DOCKER / "Dockerfile"


INSTALL_SH = DOCKER / "install.sh"


DEMO_WORKER = DEPLOY / "examples" / "demo_worker.py"


PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"


DASHBOARD = DEPLOY / "grafana" / "shmalloc-dashboard.json"


MKDASHBOARD = DEPLOY / "grafana" / "mkdashboard.py"


def parse_size(text: str) -> int:
    """'1G', '768M', '1gb', '64MiB', '1073741824' -> bytes (binary units, as Docker and --max-heap)."""
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    return int(m.group(1)) * 1024 ** " kmgt".index(m.group(2).lower() or " ")


def option(argv: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in argv, or None."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def ipc_path(endpoint: str) -> Path:
    if not endpoint.startswith("ipc://"):
        raise ValueError(f"not an ipc:// endpoint: {endpoint!r}")
    return Path(endpoint[len("ipc://") :])


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file as {section: [(key, value), ...]}, keys in order,
    repeated keys kept, comments dropped, backslash continuations joined."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    text = re.sub(r"\\\n", " ", path.read_text())
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line:
            raise AssertionError(f"{path.name}: not a unit line: {raw!r}")
        key, value = line.split("=", 1)
        current.append((key.strip(), " ".join(value.split())))
    return sections


def values(unit: dict, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: dict, section: str, key: str) -> str | None:
    vs = values(unit, section, key)
    return vs[-1] if vs else None  # systemd: the last assignment wins


def words(unit: dict, section: str, key: str) -> list[str]:
    """Space-separated list settings (Requires=, After=, ...), all assignments."""
    return [w for v in values(unit, section, key) for w in v.split()]


def is_true(v: str | None) -> bool:
    return v is not None and v.lower() in ("1", "yes", "true", "on")


def unit_env(unit: dict) -> dict[str, str]:
    env = {}
    for v in values(unit, "Service", "Environment"):
        for item in shlex.split(v):
            k, _, val = item.partition("=")
            env[k] = val
    return env


def daemon_argv() -> list[str]:
    unit = parse_unit(DAEMON_UNIT)
    return shlex.split(value(unit, "Service", "ExecStart"))


def compose_metrics_port() -> int:
    cmd = command_list(compose_config()["services"]["daemon"]["command"])
    return int(option(cmd, "--metrics-addr").rsplit(":", 1)[1])


_compose_cache: dict | None = None


def compose_config() -> dict:
    """compose.yaml as `docker compose config` normalises it, else as PyYAML reads it."""
    global _compose_cache
    if _compose_cache is not None:
        return _compose_cache
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            r = subprocess.run(
                [docker, "compose", "-f", str(COMPOSE), "config", "--format", "json"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert r.returncode == 0, r.stderr
            _compose_cache = json.loads(r.stdout)
            return _compose_cache
    try:
        import yaml
    except ImportError:
        pytest.skip("neither a working `docker compose` nor PyYAML to read compose.yaml")
    _compose_cache = yaml.safe_load(COMPOSE.read_text())
    return _compose_cache


def command_list(cmd) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
