"""Tests for the deployment files under deploy/.

What is checked, and with what:

- systemd units (deploy/systemd/): parsed here and checked for the settings the
  deployment depends on (user and group, runtime directory, socket mode, the
  worker reaching the daemon, nothing that hides /dev/shm); the ExecStopPost
  cleanup is run in a sandbox; `systemd-analyze verify` and
  `systemd-analyze security --offline` when systemd-analyze is installed.
- container (deploy/docker/): the Dockerfile's instructions, install.sh's
  syntax and argument checks, compose.yaml's structure through
  `docker compose config` when a working `docker compose` exists, else PyYAML
  when installed (it is not a dependency of the project), else skipped.
- deploy/examples/demo_worker.py against a fake heap (no daemon needed).
- Prometheus and Grafana: the scrape config parses and targets the ports the
  deployments use; the dashboard is what deploy/grafana/mkdashboard.py
  generates, names only exported metrics, and reads counters only via rate().
- Install (skipped only with SHMALLOC_SKIP_INSTALL_TESTS=1, e.g. offline): install.sh
  into a fresh venv -- the Dockerfile's own steps -- then the installed daemon and demo
  worker end to end.  It is what caught a package missing from the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
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

# The Prometheus names the daemon exports (the CLI contract). To be replaced
# by the project's own declaration of its statistics.
# The series /metrics serves, from the one declaration (shm.stats.FIELDS via service.metrics).
from service.metrics import exported_names  # noqa: E402

EXPORTED_METRICS = exported_names()

DOCKER_DEFAULT_SHM = 64 * 2**20  # a container's /dev/shm without --shm-size

slow = pytest.mark.skipif(
    os.environ.get("SHMALLOC_SKIP_INSTALL_TESTS") == "1",
    reason="SHMALLOC_SKIP_INSTALL_TESTS=1: no install from the package index into a fresh venv",
)


# ----------------------------------------------------------------- helpers


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


# ----------------------------------------------------------- systemd units


def test_daemon_unit_settings():
    unit = parse_unit(DAEMON_UNIT)
    svc = "Service"
    assert value(unit, svc, "Type") in ("simple", "exec"), "the daemon does not speak sd_notify"
    assert value(unit, svc, "User") == "shmalloc" and value(unit, svc, "Group") == "shmalloc"
    assert not is_true(value(unit, svc, "DynamicUser")), "other users' workers come in through a static group"
    assert value(unit, svc, "RuntimeDirectory") == "shmalloc"
    assert value(unit, svc, "RuntimeDirectoryMode") == "0750"
    assert value(unit, svc, "KillSignal") == "SIGTERM"
    assert value(unit, svc, "Restart") == "on-failure"
    assert value(unit, svc, "TimeoutStopSec")

    argv = daemon_argv()
    assert argv[:2] == ["/usr/local/bin/shmalloc", "daemon"]
    sock = ipc_path(option(argv, "--endpoint"))
    assert sock.parent == Path("/run") / value(unit, svc, "RuntimeDirectory"), (
        "the socket must live in the RuntimeDirectory, whose mode lets the group in"
    )
    mode = int(option(argv, "--socket-mode"), 8)
    assert mode & 0o060 == 0o060 and mode & 0o007 == 0, f"socket mode {mode:o}: group rw, world nothing"
    assert parse_size(option(argv, "--max-heap")) > 0
    assert option(argv, "--name"), "ExecStopPost names the arena; ExecStart must fix it"
    assert unit_env(unit).get("SHMALLOC_ENDPOINT") == option(argv, "--endpoint")


def test_units_keep_dev_shm_shared():
    """Nothing may give the daemon or a worker a /dev/shm of its own."""
    for path in (DAEMON_UNIT, WORKER_UNIT):
        unit = parse_unit(path)
        assert not is_true(value(unit, "Service", "PrivateIPC")), path.name
        for key in ("TemporaryFileSystem", "InaccessiblePaths", "BindPaths", "BindReadOnlyPaths", "ReadOnlyPaths"):
            for w in words(unit, "Service", key):
                parts = w.lstrip("-+").split(":")  # Bind*: SRC[:DST[:OPTS]]; others: PATH[:OPTS]
                target = parts[1] if key.startswith("Bind") and len(parts) > 1 else parts[0]
                assert target.rstrip("/") not in ("/dev", "/dev/shm") and not target.startswith("/dev/shm/"), (
                    f"{path.name}: {key}={w} changes /dev/shm"
                )
        if value(unit, "Service", "ProtectSystem") == "strict":
            assert "/dev/shm" in words(unit, "Service", "ReadWritePaths"), path.name
    daemon = parse_unit(DAEMON_UNIT)
    assert not is_true(value(daemon, "Service", "RemoveIPC")), "would delete the arena on every stop"


def test_worker_unit_reaches_the_daemon():
    daemon, worker = parse_unit(DAEMON_UNIT), parse_unit(WORKER_UNIT)
    assert DAEMON_UNIT.name in words(worker, "Unit", "Requires")
    assert DAEMON_UNIT.name in words(worker, "Unit", "After")
    assert value(daemon, "Service", "Group") in words(worker, "Service", "SupplementaryGroups")
    assert value(worker, "Service", "User") != value(daemon, "Service", "User"), "the example is another user"
    assert unit_env(worker).get("SHMALLOC_ENDPOINT") == option(daemon_argv(), "--endpoint")
    exe = shlex.split(value(worker, "Service", "ExecStart"))[0]
    assert Path(exe).name in INSTALL_SH.read_text(), f"{exe} is not what install.sh installs"


def test_sysusers_creates_the_group(tmp_path):
    exe = shutil.which("systemd-sysusers")
    if exe is None:
        pytest.skip("systemd-sysusers not installed")
    conf = SYSTEMD / "shmalloc.sysusers"
    (tmp_path / "etc").mkdir()
    r = subprocess.run([exe, f"--root={tmp_path}", str(conf)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    group = (tmp_path / "etc" / "group").read_text()
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(r"^shmalloc:x:\d+:", group, re.M), group
    assert re.search(r"^shmalloc:x:\d+:\d+:", passwd, re.M), passwd


@pytest.mark.parametrize(
    "result, removed",
    [
        ("success", True),  # daemon exited after SIGTERM: safety net
        ("timeout", True),  # SIGKILLed at TimeoutStopSec: nobody re-adopts
        ("signal", False),  # crash: Restart= follows, the new daemon re-adopts
        ("core-dump", False),
        ("exit-code", False),
    ],
)
def test_exec_stop_post_removes_arena_only_after_a_stop(tmp_path, result, removed):
    """Runs the unit's ExecStopPost under /bin/sh with /dev/shm and the
    shmalloc binary redirected into tmp_path (so the rm fallback is taken)."""
    unit = parse_unit(DAEMON_UNIT)
    (cmd,) = values(unit, "Service", "ExecStopPost")
    argv = shlex.split(cmd.lstrip("-"))
    assert argv[:2] == ["/bin/sh", "-c"], argv
    arena_name = option(daemon_argv(), "--name")
    script = (
        argv[2]
        .replace("$$", "$")  # systemd's escape for a literal $
        .replace("/dev/shm/", f"{tmp_path}/")
        .replace("/usr/local/bin/shmalloc", f"{tmp_path}/no-such-shmalloc")
    )
    arena = tmp_path / arena_name
    arena.write_bytes(b"arena")
    bystander = tmp_path / "other-segment"
    bystander.write_bytes(b"x")
    r = subprocess.run(
        ["/bin/sh", "-c", script],
        env={"PATH": os.defpath, "SERVICE_RESULT": result},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r.stderr
    assert arena.exists() is not removed
    assert bystander.exists()


def _units_for_verify(tmp_path: Path) -> Path:
    """Copies of the units that `systemd-analyze verify` can check here.

    verify fails a unit whose ExecStart binary does not exist, and
    /usr/local/bin/shmalloc{,-demo-worker} need not be installed where the
    tests run; so ExecStart= is pointed at /bin/true in the copies and
    everything else is kept as written. The template is also copied to an
    instance name, which is what verify checks."""
    out = tmp_path / "units"
    out.mkdir()
    for src in (DAEMON_UNIT, WORKER_UNIT):
        text = re.sub(r"\\\n", " ", src.read_text())
        text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", text)
        (out / src.name).write_text(text)
    shutil.copy(out / WORKER_UNIT.name, out / "shmalloc-worker@1.service")
    return out


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian: apt-get install systemd)")
    return exe


def test_systemd_analyze_verify(tmp_path):
    exe = _systemd_analyze()
    units = _units_for_verify(tmp_path)
    for name in (DAEMON_UNIT.name, "shmalloc-worker@1.service"):
        r = subprocess.run(
            [exe, "verify", "--man=no", str(units / name)], capture_output=True, text=True, timeout=120
        )
        # verify exits 0 on warnings such as "Unknown key ..., ignoring": any
        # line about our units is a failure too.
        ours = [line for line in r.stderr.splitlines() if "shmalloc" in line]
        assert r.returncode == 0 and not ours, f"{name}:\n{r.stderr}"


def test_systemd_analyze_verify_catches_a_broken_unit(tmp_path):
    """The verify test above can fail: a misspelt key is reported."""
    exe = _systemd_analyze()
    units = _units_for_verify(tmp_path)
    broken = units / DAEMON_UNIT.name
    broken.write_text(broken.read_text().replace("KillSignal=", "KilSignal="))
    r = subprocess.run([exe, "verify", "--man=no", str(broken)], capture_output=True, text=True, timeout=120)
    assert "KilSignal" in r.stderr


def test_systemd_analyze_security(tmp_path):
    exe = _systemd_analyze()
    units = _units_for_verify(tmp_path)
    probe = subprocess.run([exe, "security", "--help"], capture_output=True, text=True, timeout=60)
    if "--offline" not in probe.stdout:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    for name in (DAEMON_UNIT.name, "shmalloc-worker@1.service"):
        r = subprocess.run(
            # --threshold is in tenths: fail above an exposure of 3.0 ("OK" is < 4).
            [exe, "security", "--offline=yes", "--no-pager", "--threshold=30", str(units / name)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, f"{name}: exposure above 3.0\n{r.stdout[-2000:]}{r.stderr}"


# --------------------------------------------------------------- container


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
        ["sh", str(INSTALL_SH), str(tmp_path), "/nonexistent/python"], capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "pyproject.toml" in r.stderr, r.stderr
    r = subprocess.run(["sh", str(INSTALL_SH)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "usage" in r.stderr


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
    global _compose_cache
    saved, _compose_cache = _compose_cache, cfg
    try:
        with pytest.raises(AssertionError):
            test_compose_structure()
    finally:
        _compose_cache = saved


# ------------------------------------------------------------- demo worker


def load_demo_worker():
    spec = importlib.util.spec_from_file_location("demo_worker", DEMO_WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeHeap:
    """The public API of client.Heap that demo_worker.py uses, in a bytearray."""

    def __init__(self, corrupt: bool = False):
        self.mem = bytearray(1 << 20)
        self.top = 0
        self.live: dict[int, int] = {}
        self.mallocs = self.frees = 0
        self.corrupt = corrupt

    def alloc(self, size):
        class Block:
            pass

        blk = Block()
        blk.handle, blk.size, blk.capacity = self.top, size, size
        blk.buf = memoryview(self.mem)[self.top : self.top + size]
        self.live[self.top] = size
        self.top += size
        self.mallocs += 1
        return blk

    def free(self, blk):
        handle = getattr(blk, "handle", blk)
        del self.live[handle]
        self.frees += 1

    def view(self, handle):
        mv = memoryview(self.mem)[handle : handle + self.live[handle]]
        return bytes(len(mv)) if self.corrupt else mv

    def stats(self):
        return {
            "consistent": True,
            "epoch": self.mallocs,
            "num_p": 1,
            "heap_alloc": sum(self.live.values()),
            "heap_objects": self.mallocs - self.frees,
            "sys": len(self.mem),
            "pause_ns": 1000,
        }


def test_demo_worker_round_frees_what_it_allocates():
    demo = load_demo_worker()
    heap = FakeHeap()
    line = demo.one_round(heap, [64, 1000, 40000], 0)
    assert line["heap_objects"] == 3 and line["heap_alloc"] == 64 + 1000 + 40000
    assert len(line["handles"]) == 3
    assert heap.live == {} and heap.mallocs == heap.frees == 3
    json.dumps(line)


def test_demo_worker_detects_bad_readback_and_still_frees():
    demo = load_demo_worker()
    heap = FakeHeap(corrupt=True)
    with pytest.raises(RuntimeError, match="read back"):
        demo.one_round(heap, [64, 128], 0)
    assert heap.live == {}


@pytest.mark.parametrize("args", [["--sizes", "0"], ["--sizes", "a,b"], ["--rounds", "-1"], ["--interval", "-1"]])
def test_demo_worker_rejects_bad_arguments(args):
    demo = load_demo_worker()
    with pytest.raises(SystemExit) as e:
        demo.parse_args(args)
    assert e.value.code == 2


def test_demo_worker_help_needs_no_package():
    r = subprocess.run([sys.executable, str(DEMO_WORKER), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--rounds" in r.stdout


# ------------------------------------------------------ Prometheus, Grafana


def test_prometheus_scrape_config():
    yaml = pytest.importorskip("yaml", reason="PyYAML not installed")
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "shmalloc"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    host_metrics = option(daemon_argv(), "--metrics-addr")
    assert host_metrics in targets, "the systemd daemon's --metrics-addr"
    assert f"daemon:{compose_metrics_port()}" in targets, "the compose daemon"
    promtool = shutil.which("promtool")
    if promtool:
        r = subprocess.run([promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    for var in d.get("templating", {}).get("list", []):
        q = var.get("query")
        exprs.append(q.get("query", "") if isinstance(q, dict) else str(q or ""))
    return exprs


METRIC_RE = re.compile(r"\bshmalloc_[a-z0-9_]+")
COUNTER_FUNCS = {"rate", "irate", "increase"}


def enclosing_function(expr: str, pos: int) -> str:
    """Name of the innermost function call around expr[pos] ('' if none)."""
    depth = 0
    for i in range(pos - 1, -1, -1):
        c = expr[i]
        if c == ")":
            depth += 1
        elif c == "(":
            if depth == 0:
                m = re.search(r"([a-z_]+)\s*$", expr[:i])
                return m.group(1) if m else ""
            depth -= 1
    return ""


def check_metric_use(exprs: list[str]) -> list[str]:
    problems = []
    for expr in exprs:
        for m in METRIC_RE.finditer(expr):
            name, func = m.group(0), enclosing_function(expr, m.start())
            if name not in EXPORTED_METRICS:
                problems.append(f"{name}: not exported ({expr})")
            elif name.endswith("_total") and func not in COUNTER_FUNCS:
                problems.append(f"{name}: counter read without rate() ({expr})")
            elif not name.endswith("_total") and func in COUNTER_FUNCS:
                problems.append(f"{name}: gauge inside {func}() ({expr})")
    return problems


def test_metric_use_checker_can_fail():
    assert check_metric_use(['rate(shmalloc_mallocs_total{a="b"}[5m])', "shmalloc_heap_objects"]) == []
    assert len(check_metric_use(["shmalloc_mallocs_total"])) == 1
    assert len(check_metric_use(["rate(shmalloc_heap_objects[5m])"])) == 1
    assert len(check_metric_use(["shmalloc_heap_bytes"])) == 1
    assert check_metric_use(["topk(10, sum by (size) (rate(shmalloc_class_mallocs_total[1m])))"]) == []


def test_dashboard_uses_only_exported_metrics_correctly():
    d = dashboard()
    exprs = dashboard_exprs(d)
    assert check_metric_use(exprs) == []
    used = {m for e in exprs for m in METRIC_RE.findall(e)}
    required = {
        "shmalloc_heap_alloc_bytes",
        "shmalloc_heap_inuse_bytes",
        "shmalloc_heap_idle_bytes",
        "shmalloc_heap_released_bytes",
        "shmalloc_mallocs_total",
        "shmalloc_frees_total",
        "shmalloc_heap_objects",
        "shmalloc_sys_bytes",
        "shmalloc_heap_sys_bytes",
        "shmalloc_mspan_sys_bytes",
        "shmalloc_mcache_sys_bytes",
        "shmalloc_gc_sys_bytes",
        "shmalloc_other_sys_bytes",
        "shmalloc_snapshot_pause_seconds",
        "shmalloc_snapshot_age_seconds",
        "shmalloc_class_mallocs_total",
    }
    assert required <= used, f"missing: {sorted(required - used)}"
    assert any(e.startswith("topk(") and "shmalloc_class_mallocs_total" in e for e in exprs)


def test_dashboard_is_valid_grafana():
    d = dashboard()
    assert isinstance(d["schemaVersion"], int) and d["schemaVersion"] >= 36
    assert d["uid"] and d["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["type"] in ("timeseries", "stat", "gauge", "bargauge", "table", "row"), p["type"]
        for t in p.get("targets", []):
            assert t["expr"] and t["refId"]
            uid = t.get("datasource", p.get("datasource", {})).get("uid", "")
            for ref in re.findall(r"\$\{?(\w+)", uid + t["expr"]):
                assert ref.startswith("__") or ref in variables, f"{p['title']}: ${ref} undefined"
    stacked = [
        p for p in d["panels"] if p["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode") == "normal"
    ]
    assert stacked and any("shmalloc_other_sys_bytes" in t["expr"] for p in stacked for t in p["targets"])


def test_dashboard_is_generated():
    r = subprocess.run([sys.executable, str(MKDASHBOARD), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


# --------------------------------------------------------------------- slow


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


@slow
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


@slow
def test_installed_daemon_and_demo_worker(venv, tmp_path):
    """The installed daemon serves the installed demo worker, and SIGTERM leaves nothing behind."""
    name = f"shmalloc-deploytest-{os.getpid()}"
    sock = tmp_path / "control.sock"
    endpoint = f"ipc://{sock}"
    env = {**os.environ, "SHMALLOC_ENDPOINT": endpoint}
    daemon = subprocess.Popen(
        [str(venv / "bin" / "shmalloc"), "daemon", "--endpoint", endpoint, "--name", name, "--max-heap", "64M"],
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
