"""The systemd units (deploy/systemd/): parsed here and checked for the settings the deployment
depends on (user and group, runtime directory, socket mode, the worker reaching the daemon,
nothing that hides /dev/shm); the ExecStopPost cleanup is run in a sandbox; `systemd-analyze
verify` and `systemd-analyze security --offline` when systemd-analyze is installed."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from support_deploy import (
    DAEMON_UNIT,
    INSTALL_SH,
    SYSTEMD,
    WORKER_UNIT,
    daemon_argv,
    ipc_path,
    is_true,
    option,
    parse_size,
    parse_unit,
    unit_env,
    value,
    values,
    words,
)


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
        for key in (
            "TemporaryFileSystem",
            "InaccessiblePaths",
            "BindPaths",
            "BindReadOnlyPaths",
            "ReadOnlyPaths",
        ):
            for w in words(unit, "Service", key):
                parts = w.lstrip("-+").split(":")  # Bind*: SRC[:DST[:OPTS]]; others: PATH[:OPTS]
                target = parts[1] if key.startswith("Bind") and len(parts) > 1 else parts[0]
                assert target.rstrip("/") not in ("/dev", "/dev/shm") and not target.startswith(
                    "/dev/shm/"
                ), f"{path.name}: {key}={w} changes /dev/shm"
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
