"""Prometheus and Grafana (deploy/prometheus/, deploy/grafana/): the scrape config parses and
targets the ports the deployments use; the dashboard is what deploy/grafana/mkdashboard.py
generates, names only exported metrics, and reads counters only via rate()."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from support_deploy import DASHBOARD, MKDASHBOARD, PROMETHEUS, compose_metrics_port, daemon_argv, option

from service.metrics import exported_names

EXPORTED_METRICS = exported_names()


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
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        assert p["type"] in ("timeseries", "stat", "gauge", "bargauge", "table", "row"), p["type"]
        for t in p.get("targets", []):
            assert t["expr"] and t["refId"]
            uid = t.get("datasource", p.get("datasource", {})).get("uid", "")
            for ref in re.findall(r"\$\{?(\w+)", uid + t["expr"]):
                assert ref.startswith("__") or ref in variables, f"{p['title']}: ${ref} undefined"
    stacked = [
        p
        for p in d["panels"]
        if p["fieldConfig"]["defaults"].get("custom", {}).get("stacking", {}).get("mode") == "normal"
    ]
    assert stacked and any("shmalloc_other_sys_bytes" in t["expr"] for p in stacked for t in p["targets"])


def test_dashboard_is_generated():
    r = subprocess.run(
        [sys.executable, str(MKDASHBOARD), "--check"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
