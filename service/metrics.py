"""Prometheus export of the daemon's snapshots.  See shm/__init__.py for the allocator's overview.

`shmalloc daemon --metrics-addr HOST:PORT` serves /metrics in the Prometheus text format
(prometheus_client, the `metrics` extra).  A scrape never stops the world: it renders the latest
consistent snapshot -- one the daemon takes every --metrics-interval seconds, or one a client
asked for, whichever is newer -- and says how old it is (shmalloc_snapshot_age_seconds).

Names follow Prometheus conventions and come from the one declaration, shm.stats.FIELDS:

    gauge,   bytes     shmalloc_<name>_bytes           (shmalloc_heap_alloc_bytes)
    gauge,   objects   shmalloc_<name>                 (shmalloc_heap_objects)
    counter, bytes     shmalloc_<name>_bytes_total     (shmalloc_total_alloc_bytes_total)
    counter, objects   shmalloc_<name>_total           (shmalloc_mallocs_total)

plus the snapshot's own series and one series per size class, labelled by the class size.
"""

import time

from shm.stats import FIELDS

PREFIX = "shmalloc_"
# Series that are not figures of the arena, with their help text.
SNAPSHOT_SERIES = (
    ("num_p", "gauge", "Live Ps (connected workers) at the snapshot."),
    ("snapshot_epoch", "gauge", "Epoch (number) of the snapshot served."),
    ("snapshot_consistent", "gauge", "1 when every P was parked and flushed before reading."),
    ("snapshot_pause_seconds", "gauge", "Stop-the-world pause of the snapshot served."),
    ("snapshot_age_seconds", "gauge", "Seconds since the snapshot served was taken."),
)
CLASS_SERIES = (
    ("class_mallocs", "counter", "Objects of this size class ever allocated.", "mallocs"),
    ("class_frees", "counter", "Objects of this size class ever freed.", "frees"),
)


def base_name(name, unit):
    """Prometheus name (without _total) of a FIELDS entry."""
    if unit == "bytes" and not name.endswith("_bytes"):
        name += "_bytes"
    return PREFIX + name


def figure_series():
    """(field, prometheus name as exported, kind, help) for every figure of FIELDS."""
    out = []
    for name, unit, kind, help_ in FIELDS:
        n = base_name(name, unit)
        out.append((name, n + "_total" if kind == "counter" else n, kind, f"{help_} ({unit})"))
    return out


def exported_names():
    """Every series name /metrics carries (counters with their _total)."""
    names = {n for _, n, _, _ in figure_series()}
    names |= {PREFIX + n for n, _, _ in SNAPSHOT_SERIES}
    names |= {PREFIX + n + "_total" for n, _, _, _ in CLASS_SERIES}
    return frozenset(names)


class SnapshotCollector:
    """A prometheus_client collector over the daemon's latest consistent snapshot."""

    def __init__(self, latest):
        self.latest = latest  # callable -> snapshot dict or None

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        snap = self.latest()
        if snap is None:
            return
        for field, name, kind, help_ in figure_series():
            if kind == "counter":
                yield CounterMetricFamily(name.removesuffix("_total"), help_, value=snap[field])
            else:
                yield GaugeMetricFamily(name, help_, value=snap[field])
        age = max(0.0, (time.time_ns() - snap["taken_ns"]) / 1e9)
        values = {
            "num_p": snap["num_p"],
            "snapshot_epoch": snap["epoch"],
            "snapshot_consistent": int(snap["consistent"]),
            "snapshot_pause_seconds": snap["pause_ns"] / 1e9,
            "snapshot_age_seconds": age,
        }
        for name, _, help_ in SNAPSHOT_SERIES:
            yield GaugeMetricFamily(PREFIX + name, help_, value=values[name])
        for name, _, help_, key in CLASS_SERIES:
            fam = CounterMetricFamily(PREFIX + name, help_, labels=["size"])
            for e in snap["by_size"]:
                fam.add_metric([str(e["size"])], e[key])
            yield fam


class MetricsServer:
    """/metrics over HTTP in a thread of the daemon; never touches the arena itself."""

    def __init__(self, daemon, addr):
        import importlib.util

        from shm.errors import StartupError

        if importlib.util.find_spec("prometheus_client") is None:
            raise StartupError("--metrics-addr needs prometheus_client: pip install 'shmalloc[metrics]'")
        host, _, port = addr.rpartition(":")
        if not host or not port.isdigit():
            raise StartupError(f"--metrics-addr takes HOST:PORT, got {addr!r}")
        self.host, self.port = host.strip("[]"), int(port)
        self.daemon = daemon
        self.server = None
        self.thread = None

    def start(self):
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(SnapshotCollector(lambda: self.daemon.last_snapshot))
        self.server, self.thread = start_http_server(self.port, self.host, registry)
        self.port = self.server.server_port
        return self

    @property
    def url(self):
        return f"http://{self.host}:{self.port}/metrics"

    def stop(self):
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
