"""Running it for real: /metrics over HTTP, `shmalloc stats --watch` in a pseudo-terminal,
JSON logs."""

import json
import os
import pty
import re
import select
import signal
import time
import urllib.request

import pytest
from support import DEADLINE, EXE

import client
from service.metrics import exported_names, figure_series
from shm.stats import FIELDS

prom_parser = pytest.importorskip("prometheus_client.parser", reason="the metrics extra is not installed")


def metrics_url(d):
    deadline = time.monotonic() + 30
    while True:
        m = re.search(r"metrics=(http://\S+/metrics)", d.log())
        if m:
            return m.group(1)
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.05)


def scrape(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def test_metrics_served_over_http_equal_the_snapshot_of_the_same_epoch(start_daemon):
    d = start_daemon(extra=("--metrics-addr", "127.0.0.1:0", "--metrics-interval", "3600"))
    url = metrics_url(d)
    with client.connect(d.endpoint) as heap:
        blocks = [heap.alloc(s) for s in (8, 8, 64, 3000, 50_000)]
        heap.free(blocks.pop(0))
        snap = heap.stats()  # the newest consistent snapshot: what /metrics must serve now
        text = scrape(url)
        for b in blocks:
            heap.free(b)
    fams = {f.name: f for f in prom_parser.text_string_to_metric_families(text)}
    samples = {s.name: s for f in fams.values() for s in f.samples if not s.labels}
    served = {s.name for f in fams.values() for s in f.samples}
    missing = exported_names() - served
    assert not missing, f"declared but not served: {sorted(missing)}"
    assert samples["shmalloc_snapshot_epoch"].value == snap["epoch"]
    for field, name, kind, _help in figure_series():
        assert samples[name].value == snap[field], (
            f"{name} = {samples[name].value}, snapshot {field} = {snap[field]}"
        )
        fam = fams[name.removesuffix("_total") if kind == "counter" else name]
        assert fam.type == kind and fam.documentation.startswith(
            dict((f[0], f[3]) for f in FIELDS)[field][:20]
        )
    assert samples["shmalloc_num_p"].value == snap["num_p"] == 1
    assert samples["shmalloc_snapshot_consistent"].value == 1
    assert samples["shmalloc_snapshot_age_seconds"].value >= 0
    by_size = {
        s.labels["size"]: s.value
        for s in fams["shmalloc_class_mallocs"].samples
        if s.name == "shmalloc_class_mallocs_total"
    }
    assert len(by_size) == len(snap["by_size"])
    for e in snap["by_size"]:
        assert by_size[str(e["size"])] == e["mallocs"]
    assert by_size["8"] == 2 and by_size["64"] == 1
    # A scrape does not stop the world: two scrapes, no new snapshot.
    text2 = scrape(url)
    again = {s.name: s.value for f in prom_parser.text_string_to_metric_families(text2) for s in f.samples}
    assert again["shmalloc_snapshot_epoch"] == snap["epoch"]


def read_until(fd, pattern, deadline_s=60):
    buf = b""
    end = time.monotonic() + deadline_s
    while not re.search(pattern, buf):
        left = end - time.monotonic()
        assert left > 0, f"never saw {pattern!r} in {buf[-2000:]!r}"
        r, _, _ = select.select([fd], [], [], left)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_watch_in_a_pty_redraws_and_exits_on_sigint(start_daemon):
    d = start_daemon()
    with client.connect(d.endpoint) as heap:
        keep = [heap.alloc(100) for _ in range(5)]
        pid, fd = pty.fork()
        if pid == 0:  # the child: the real CLI on a real terminal
            os.execvp(EXE[0], [*EXE, "stats", "--watch", "0.2", "--endpoint", d.endpoint])
        try:
            out = read_until(fd, rb"(epoch \d+[\s\S]*){3}")
            epochs = [int(x) for x in re.findall(rb"epoch (\d+)", out)]
            assert len(set(epochs)) >= 2, "the view did not redraw with new snapshots"
            assert b"\x1b[H" in out, "no cursor-home redraw"
            assert b"heap_alloc" in out and b"mallocs" in out
            os.kill(pid, signal.SIGINT)
            rest = read_until(fd, rb"\x1b\[\?25h")  # the cursor comes back
            _, status = os.waitpid(pid, 0)
            assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
            assert rest
        finally:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(fd)
        for b in keep:
            heap.free(b)


def test_json_logs_name_lifecycle_events(start_daemon):
    d = start_daemon(extra=("--log-format", "json"))
    with client.connect(d.endpoint) as heap:
        heap.free(heap.alloc(10))
    client.stats(d.endpoint)
    assert d.stop() == 0
    lines = [json.loads(line) for line in d.log().splitlines() if line.strip()]
    events = [x["event"] for x in lines]
    for want in ("started", "P joined", "P left", "final snapshot", "stopped"):
        assert want in events, events
    assert all({"ts", "level", "event"} <= set(x) for x in lines)
    started = lines[events.index("started")]
    assert started["endpoint"] == d.endpoint and started["arena"] == d.name


def test_slow_snapshots_are_logged(start_daemon, tmp_path):
    d = start_daemon(extra=("--park-deadline-ms", "200", "--slow-snapshot-ms", "1000"))
    import multiprocessing as mp

    import mpworkers

    ctx = mp.get_context("spawn")
    ready, release, out = ctx.Event(), ctx.Event(), ctx.Queue()
    w = ctx.Process(target=mpworkers.stuck_worker, args=(d.endpoint, ready, release, out))
    w.start()
    try:
        assert ready.wait(DEADLINE)
        snap = client.stats(d.endpoint, deadline_ms=200)
        assert not snap["consistent"]
    finally:
        release.set()
    out.get(timeout=DEADLINE)
    w.join(DEADLINE)
    log = d.log()
    assert "warning snapshot" in log and "consistent=False" in log and "did not park" in log


def test_slow_snapshot_threshold(start_daemon):
    quiet = start_daemon(extra=("--slow-snapshot-ms", "60000"))
    loud = start_daemon(
        endpoint=quiet.endpoint.replace("control.sock", "loud.sock"), extra=("--slow-snapshot-ms", "0")
    )
    for d in (quiet, loud):
        assert client.stats(d.endpoint)["consistent"]
    assert "warning snapshot" not in quiet.log()
    assert re.search(r"warning snapshot .*consistent=True", loud.log()), loud.log()
