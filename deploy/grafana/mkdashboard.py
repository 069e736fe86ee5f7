#!/usr/bin/env python3
"""Generate deploy/grafana/shmalloc-dashboard.json.

    python deploy/grafana/mkdashboard.py            # rewrite the JSON
    python deploy/grafana/mkdashboard.py --check    # exit 1 if it is stale

The dashboard is code so that its queries can be reviewed and tested:
tests/test_deploy_monitoring.py checks that the committed JSON is what this script
prints, that it only names metrics the daemon exports, and that counters are
only read through rate()/increase().

Layout (24 columns): a row of headline stats; heap bytes beside the stacked
sys breakdown (which must add up to shmalloc_sys_bytes, drawn as a dashed
line); malloc/free rates beside allocation throughput; live objects, span and
cache metadata, large objects; snapshot pause beside snapshot age; the ten
busiest size classes by malloc and by free rate.
"""

from __future__ import annotations

import json
import pathlib
import sys

OUT = pathlib.Path(__file__).with_name("shmalloc-dashboard.json")

DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = '{instance=~"$instance"}'
RATE = "[$__rate_interval]"


def target(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def targets(*pairs: tuple[str, str]) -> list[dict]:
    return [target(e, lg, chr(ord("A") + i)) for i, (e, lg) in enumerate(pairs)]


class Layout:
    """Hands out panel ids and grid positions, left to right, top to bottom."""

    def __init__(self) -> None:
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def place(self, w: int, h: int) -> tuple[int, dict]:
        if self.x + w > 24:
            self.x, self.y, self.row_h = 0, self.y + self.row_h, 0
        pos = {"x": self.x, "y": self.y, "w": w, "h": h}
        self.x += w
        self.row_h = max(self.row_h, h)
        pid = self.next_id
        self.next_id += 1
        return pid, pos


def stat(lay: Layout, title: str, expr: str, unit: str, description: str) -> dict:
    pid, pos = lay.place(4, 4)
    return {
        "id": pid,
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": pos,
        "targets": targets((expr, "{{instance}}")),
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
    }


def timeseries(
    lay: Layout,
    title: str,
    unit: str,
    description: str,
    pairs: list[tuple[str, str]],
    *,
    w: int = 12,
    stack: bool = False,
    overrides: list[dict] | None = None,
) -> dict:
    pid, pos = lay.place(w, 8)
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 25 if stack else 10, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "id": pid,
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": pos,
        "targets": targets(*pairs),
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def g(name: str) -> str:
    """A gauge, read as is."""
    return f"{name}{SEL}"


def r(name: str) -> str:
    """A counter, read as a per-second rate."""
    return f"rate({name}{SEL}{RATE})"


def panels() -> list[dict]:
    lay = Layout()
    out = [
        stat(lay, "Connected Ps", g("shmalloc_num_p"), "none", "Worker processes holding a P slot."),
        stat(
            lay,
            "Heap alloc",
            g("shmalloc_heap_alloc_bytes"),
            "bytes",
            "Bytes of live objects (small and large).",
        ),
        stat(lay, "Live objects", g("shmalloc_heap_objects"), "none", "mallocs - frees."),
        stat(
            lay,
            "Large bytes",
            g("shmalloc_large_bytes"),
            "bytes",
            "Bytes of live spans of objects over 32 KiB.",
        ),
        stat(
            lay, "Sys", g("shmalloc_sys_bytes"), "bytes", "Arena bytes committed from /dev/shm, all regions."
        ),
        stat(
            lay,
            "Snapshot age",
            g("shmalloc_snapshot_age_seconds"),
            "s",
            "Age of the snapshot behind the last scrape.",
        ),
        timeseries(
            lay,
            "Heap bytes",
            "bytes",
            "heap_alloc <= heap_inuse; heap_idle + heap_inuse = heap_sys; heap_released <= heap_idle.",
            [
                (g("shmalloc_heap_alloc_bytes"), "{{instance}} alloc"),
                (g("shmalloc_heap_inuse_bytes"), "{{instance}} inuse"),
                (g("shmalloc_heap_idle_bytes"), "{{instance}} idle"),
                (g("shmalloc_heap_released_bytes"), "{{instance}} released"),
            ],
        ),
        timeseries(
            lay,
            "Sys breakdown",
            "bytes",
            "Stacked parts of sys; the dashed line is sys itself and must sit on top of the stack.",
            [
                (g("shmalloc_heap_sys_bytes"), "{{instance}} heap"),
                (g("shmalloc_mspan_sys_bytes"), "{{instance}} mspan"),
                (g("shmalloc_mcache_sys_bytes"), "{{instance}} mcache"),
                (g("shmalloc_gc_sys_bytes"), "{{instance}} gc"),
                (g("shmalloc_other_sys_bytes"), "{{instance}} other"),
                (g("shmalloc_sys_bytes"), "{{instance}} sys (total)"),
            ],
            stack=True,
            overrides=[
                {
                    "matcher": {"id": "byFrameRefID", "options": "F"},
                    "properties": [
                        {"id": "custom.stacking", "value": {"mode": "none", "group": "total"}},
                        {"id": "custom.fillOpacity", "value": 0},
                        {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                    ],
                }
            ],
        ),
        timeseries(
            lay,
            "Malloc and free rate",
            "ops",
            "Objects allocated and freed per second, all sizes; large = objects over 32 KiB.",
            [
                (r("shmalloc_mallocs_total"), "{{instance}} mallocs"),
                (r("shmalloc_frees_total"), "{{instance}} frees"),
                (r("shmalloc_large_mallocs_total"), "{{instance}} large mallocs"),
                (r("shmalloc_large_frees_total"), "{{instance}} large frees"),
            ],
        ),
        timeseries(
            lay,
            "Allocation throughput",
            "Bps",
            "Bytes allocated per second (rate of the cumulative total_alloc).",
            [(r("shmalloc_total_alloc_bytes_total"), "{{instance}} allocated")],
        ),
        timeseries(
            lay,
            "Live objects",
            "none",
            "heap_objects = mallocs - frees.",
            [(g("shmalloc_heap_objects"), "{{instance}} objects")],
            w=8,
        ),
        timeseries(
            lay,
            "Span and cache metadata",
            "bytes",
            "Arena bytes of the span table and of the P slots' caches: reserved (sys) and used (inuse).",
            [
                (g("shmalloc_mspan_sys_bytes"), "{{instance}} mspan sys"),
                (g("shmalloc_mspan_inuse_bytes"), "{{instance}} mspan inuse"),
                (g("shmalloc_mcache_sys_bytes"), "{{instance}} mcache sys"),
                (g("shmalloc_mcache_inuse_bytes"), "{{instance}} mcache inuse"),
            ],
            w=8,
        ),
        timeseries(
            lay,
            "Large objects",
            "bytes",
            "Bytes of live large spans (objects over 32 KiB).",
            [(g("shmalloc_large_bytes"), "{{instance}} large")],
            w=8,
        ),
        timeseries(
            lay,
            "Large frees across processes",
            "ops",
            "Large objects freed by another process, per second: taken back by their owner out of the "
            "freer's buffer (no lock on the freeing side, no page heap), or handed to it through its "
            "pending list (the freer applied its buffer first).",
            [
                (r("shmalloc_large_taken_back_total"), "{{instance}} taken back"),
                (r("shmalloc_large_pending_frees_total"), "{{instance}} pending list"),
            ],
            w=8,
        ),
        timeseries(
            lay,
            "Snapshot pause",
            "s",
            "Stop-the-world time of a snapshot: park every P, flush every cache, read the stats.",
            [
                (g("shmalloc_snapshot_pause_seconds"), "{{instance}} last"),
                (f"max_over_time(shmalloc_snapshot_pause_seconds{SEL}{RATE})", "{{instance}} max"),
            ],
        ),
        timeseries(
            lay,
            "Snapshot age",
            "s",
            "Seconds between the snapshot and the scrape that served it.",
            [(g("shmalloc_snapshot_age_seconds"), "{{instance}} age")],
        ),
        timeseries(
            lay,
            "Top 10 size classes by malloc rate",
            "ops",
            "Small-object mallocs per second, by size class (bytes).",
            [
                (
                    f"topk(10, sum by (size) ({r('shmalloc_class_mallocs_total')}))",
                    "{{size}} B",
                )
            ],
        ),
        timeseries(
            lay,
            "Top 10 size classes by free rate",
            "ops",
            "Small-object frees per second, by size class (bytes).",
            [
                (
                    f"topk(10, sum by (size) ({r('shmalloc_class_frees_total')}))",
                    "{{size}} B",
                )
            ],
        ),
    ]
    return out


def dashboard() -> dict:
    return {
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "stat", "name": "Stat", "version": ""},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "annotations": {"list": []},
        "description": "shmalloc daemon: heap, allocation rates, size classes, snapshot pauses.",
        "editable": True,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": panels(),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["shmalloc"],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "instance",
                    "label": "Instance",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(shmalloc_sys_bytes, instance)",
                    "query": {
                        "query": "label_values(shmalloc_sys_bytes, instance)",
                        "refId": "PrometheusVariableQueryEditor-VariableQuery",
                    },
                    "current": {},
                    "hide": 0,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "refresh": 2,
                    "regex": "",
                    "sort": 1,
                },
            ]
        },
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "shmalloc",
        "uid": "shmalloc",
        "version": 1,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run {argv[0]}", file=sys.stderr)
            return 1
        return 0
    if argv[1:]:
        print(__doc__, file=sys.stderr)
        return 2
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
