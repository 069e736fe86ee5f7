"""Tests for service/render.py: the stats table, JSON, rates and the live view, on hand-made
snapshots (no daemon)."""

import copy
import io
import json

import pytest

from service import render as R
from service.render import Watch, human_bytes, human_count, stats_json, stats_table
from shm.sizeclasses import CLASS_TO_SIZE
from shm.stats import FIELDS, identities

T0 = 1_700_000_000_000_000_000  # taken_ns of the base snapshot
PAGE = 8192


def make_snap(used=None, large=(3, 1, 2), taken_ns=T0, **meta):
    """A snapshot satisfying every identity of shm.stats.identities.

    used: {class size: (mallocs, frees)}; large: (large_mallocs, large_frees, live large pages)."""
    used = {16: (1000, 400), 48: (300, 300), 1024: (50, 10)} if used is None else used
    by = [
        {"size": s, "mallocs": used.get(s, (0, 0))[0], "frees": used.get(s, (0, 0))[1]}
        for s in CLASS_TO_SIZE[1:]
    ]
    lm, lf, lpages = large
    s = {"by_size": by, "large_mallocs": lm, "large_frees": lf, "large_bytes": lpages * PAGE, "bad_frees": 0}
    s.update(large_taken_back=lf // 2, large_pending_frees=lf - lf // 2)
    small_live = sum((e["mallocs"] - e["frees"]) * e["size"] for e in by)
    s["heap_alloc"] = small_live + s["large_bytes"]
    s["heap_inuse"] = 3 * 1024 * 1024  # 3.0 MiB
    s["heap_idle"] = 1024 * 1024 + 512 * 1024  # 1.5 MiB
    s["heap_sys"] = s["heap_inuse"] + s["heap_idle"]
    s["heap_released"] = 512 * 1024
    s.update(released_bytes=2 * 1024 * 1024, scavenged_bytes=1024 * 1024, retain_target=256 * 1024)
    s["scavenge_hold_ns"] = 310_000
    s["mallocs"] = sum(e["mallocs"] for e in by) + lm
    s["frees"] = sum(e["frees"] for e in by) + lf
    s["heap_objects"] = s["mallocs"] - s["frees"]
    s["total_alloc"] = sum(e["mallocs"] * e["size"] for e in by) + lm * 5 * PAGE
    s.update(
        mspan_sys=4096,
        mspan_inuse=2048,
        mcache_sys=65536,
        mcache_inuse=16384,
        gc_sys=s["heap_sys"] // 8,
        other_sys=12345,
    )
    s["sys"] = s["heap_sys"] + s["mspan_sys"] + s["mcache_sys"] + s["gc_sys"] + s["other_sys"]
    s.update(
        consistent=True,
        epoch=7,
        pause_ns=420_000,
        num_p=2,
        unflushed=[],
        taken_ns=taken_ns,
        per_p=[
            {
                "slot": 0,
                "pid": 4242,
                "state": "parked",
                "park_ns": 15_000,
                "cached_spans": 3,
                "listed_returned": 12,
            },
            {"slot": 3, "pid": 4343, "state": "dead", "park_ns": 0, "cached_spans": 1, "listed_returned": 0},
        ],
    )
    s.update(meta)
    return s


def section(text, title_start):
    """The indented lines under the line starting with title_start, up to the next blank line."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(title_start))
    out = []
    for line in lines[i + 1 :]:
        if not line.strip():
            break
        out.append(line)
    return out


def test_fixture_is_a_valid_snapshot():
    s = make_snap()
    assert identities(s) == []
    assert len(s["by_size"]) == 66
    assert all(name in s for name, *_ in FIELDS)


def test_human_bytes_and_count():
    assert human_bytes(0) == "0 B"
    assert human_bytes(512) == "512 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1024) == "1.0 KiB"
    assert human_bytes(1536 * 1024) == "1.5 MiB"
    assert human_bytes(1024 * 1024 - 1) == "1.0 MiB"  # never "1024.0 KiB"
    assert human_bytes(3 * 1024**3) == "3.0 GiB"
    assert human_count(0) == "0"
    assert human_count(999) == "999"
    assert human_count(1500) == "1.5k"
    assert human_count(2_000_000) == "2.0M"
    assert human_count(999_999) == "1.0M"
    assert human_count(500.0) == "500"
    assert human_count(0.5) == "0.5"


def test_table_shows_figures_with_units_and_help():
    s = make_snap()
    out = stats_table(s)
    lines = out.splitlines()
    # Every figure, in FIELDS order, with its exact value and its human unit.
    fig = {
        line.split()[0]: line
        for line in lines
        if line.split() and line.split()[0] in dict((f[0], 1) for f in FIELDS)
    }
    assert list(fig) == [f[0] for f in FIELDS]
    assert "3,145,728" in fig["heap_inuse"] and "3.0 MiB" in fig["heap_inuse"]
    assert "1.5 MiB" in fig["heap_idle"]
    assert "512.0 KiB" in fig["heap_released"]
    assert f"{s['mallocs']:,}" in fig["mallocs"] and "obj" in fig["mallocs"]
    assert "Live objects (mallocs - frees)." in fig["heap_objects"]  # help from FIELDS
    assert fig["sys"].endswith("\u2026")  # the long help was truncated
    assert max(map(len, lines)) <= 100
    # Header: epoch, consistent yes, pause in ms, num_p, taken time.
    head = lines[0]
    assert "epoch 7" in head and "consistent: yes" in head and "pause 0.420 ms" in head
    assert "num_p 2" in head and "taken 20" in head
    assert "identities: all hold" in out


def test_inconsistent_snapshot_says_no_and_lists_unflushed():
    out = stats_table(make_snap(consistent=False, unflushed=[2, 5]))
    head = out.split("\n\n")[0]
    assert "consistent: NO (unflushed P slots: 2, 5)" in head
    assert "consistent: yes" not in out


def test_more_large_frees_handed_back_than_made_breaks_an_identity():
    s = make_snap()
    assert identities(s) == []
    s["large_taken_back"] = s["large_frees"] - s["large_pending_frees"] + 1
    (bad,) = identities(s)
    assert bad.startswith("large_taken_back")


def test_broken_identity_is_listed():
    s = make_snap()
    s["sys"] += 1
    out = stats_table(s)
    assert "identities: all hold" not in out
    assert "identities: 1 BROKEN" in out
    assert f"sys {s['sys']} != heap_sys+mspan_sys+mcache_sys+gc_sys+other_sys {s['sys'] - 1}" in out


def test_slow_walk_result_shown():
    assert "slow span walk: equal" in stats_table(make_snap(slow_equal=True))
    out = stats_table(make_snap(slow_equal=False, slow_diff=["heap_alloc: 1 != 2"]))
    assert "slow span walk: DIFFERS (1 field)" in out and "heap_alloc: 1 != 2" in out
    assert "slow span walk" not in stats_table(make_snap())


def test_size_class_table_lists_only_used_classes():
    out = stats_table(make_snap())
    rows = section(out, "size classes:")
    assert rows[0].split() == ["class", "size", "mallocs", "frees", "live", "live", "bytes"]
    body = [r.split() for r in rows[1:]]
    # classes 16 B, 48 B, 1 KiB and the large-object row; nothing else.
    assert [(r[1], r[2]) for r in body] == [("16", "B"), ("48", "B"), ("1.0", "KiB"), (">", "32")]
    r16 = body[0]
    assert r16[3:6] == ["1,000", "400", "600"] and " ".join(r16[6:]) == human_bytes(600 * 16)
    assert body[1][3:6] == ["300", "300", "0"]  # used, all freed: still listed
    assert body[3][0] == "large" and body[3][4:7] == ["3", "1", "2"]


def test_size_class_top_lists_busiest_by_mallocs():
    s = make_snap(used={16: (50, 0), 48: (1000, 10), 1024: (300, 0)})
    rows = section(stats_table(s, top=2), "size classes:")
    sizes = [" ".join(r.split()[1:3]) for r in rows[1:]]
    assert sizes == ["48 B", "1.0 KiB"]  # busiest first; 16 B (50 mallocs) left out


def test_per_p_table():
    rows = section(stats_table(make_snap()), "Ps:")
    assert "park \u00b5s" in rows[0] and "listed returned" in rows[0]
    assert rows[1].split() == ["0", "4242", "parked", "15.0", "3", "12"]
    assert rows[2].split() == ["3", "4343", "dead", "0.0", "1", "0"]


def test_stats_json_roundtrip_sorted():
    s = make_snap(slow_equal=True, slow_diff=[])
    text = stats_json(s)
    assert json.loads(text) == s
    assert text == json.dumps(s, sort_keys=True)
    assert text.index('"by_size"') < text.index('"consistent"') < text.index('"sys"')


def later(prev, dt_s=2.0, add=None):
    """prev advanced by dt_s seconds and add = {size: (more mallocs, more frees)}."""
    used = {e["size"]: (e["mallocs"], e["frees"]) for e in prev["by_size"] if e["mallocs"]}
    for size, (m, f) in (add or {}).items():
        m0, f0 = used.get(size, (0, 0))
        used[size] = (m0 + m, f0 + f)
    lm, lf = prev["large_mallocs"], prev["large_frees"]
    return make_snap(
        used=used,
        large=(lm, lf, prev["large_bytes"] // PAGE),
        taken_ns=prev["taken_ns"] + int(dt_s * 1e9),
        epoch=prev["epoch"] + 1,
    )


def test_rates_between_two_snapshots():
    a = make_snap()
    b = later(a, 2.0, {16: (1000, 600)})
    assert identities(b) == []
    assert R.rates(a, b) == (500.0, 300.0, 8000.0)
    frame = Watch(lambda: b).frame(a, b)
    assert "allocations 500/s" in frame and "frees 300/s" in frame
    assert f"allocated {human_bytes(8000)}/s" in frame  # 16000 B over 2 s
    rows = section(frame, "busiest size classes")
    assert rows[1].split()[1:5] == ["16", "B", "500/s", "300/s"]
    assert len(rows) == 2  # only the class that allocated in the interval


def test_first_frame_has_no_rates():
    s = make_snap()
    frame = Watch(lambda: s).frame(None, s)
    assert "rates: allocations \u2014   frees \u2014   allocated \u2014" in frame
    assert "heap_inuse 3.0 MiB" in frame
    rows = section(frame, "busiest size classes")
    assert [r.split()[1] for r in rows[1:]] == ["16", "48", "1.0"]


def test_busiest_limited_to_top_by_rate():
    a = make_snap(used={s: (1, 0) for s in CLASS_TO_SIZE[1:13]})
    b = later(a, 1.0, {s: (i + 1, 0) for i, s in enumerate(CLASS_TO_SIZE[1:13])})
    rows = section(Watch(lambda: b).frame(a, b), "busiest size classes")[1:]
    assert len(rows) == 10
    assert rows[0].split()[1:4] == [str(CLASS_TO_SIZE[12]), "B", "12/s"]  # the fastest first


def test_counter_reset_gives_no_rates():
    a = later(make_snap(), 1.0, {16: (5000, 0)})
    b = make_snap(taken_ns=a["taken_ns"] + 10**9)  # a restarted daemon: fewer mallocs
    assert R.rates(a, b) is None
    frame = Watch(lambda: b).frame(a, b)
    assert "allocations \u2014" in frame and "counters reset" in frame


def test_run_survives_a_fetch_error_and_returns_zero():
    s = make_snap()
    calls = []

    def fetch():
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("daemon gone")
        return s

    out = io.StringIO()
    assert Watch(fetch, interval=0).run(out=out, frames=2) == 0
    text = out.getvalue()
    assert len(calls) == 2
    assert text.startswith(R.HIDE_CURSOR + "\x1b[H\x1b[2J")
    assert "error: ConnectionError: daemon gone" in text
    assert "heap_inuse 3.0 MiB" in text  # the second frame rendered the snapshot
    assert text.count(R.HOME) >= 3  # the clear, then each frame redrawn from home
    assert text.endswith(R.SHOW_CURSOR + "\n")


def test_run_error_after_good_frame_keeps_last_figures():
    s = make_snap()
    seq = iter([s, RuntimeError("restarting")])

    def fetch():
        x = next(seq)
        if isinstance(x, Exception):
            raise x
        return x

    out = io.StringIO()
    assert Watch(fetch, interval=0).run(out=out, frames=2) == 0
    last = out.getvalue().rsplit(R.HOME, 1)[1]
    assert "error: RuntimeError: restarting" in last and "last good snapshot" in last
    assert "heap_inuse 3.0 MiB" in last


def test_run_keyboard_interrupt_restores_cursor():
    def fetch():
        raise KeyboardInterrupt

    out = io.StringIO()
    assert Watch(fetch, interval=0).run(out=out) == 0
    text = out.getvalue()
    assert R.HIDE_CURSOR in text
    assert text.endswith(R.SHOW_CURSOR + "\n")


def test_run_keyboard_interrupt_during_sleep():
    s = make_snap()

    def sleep(_):
        raise KeyboardInterrupt

    out = io.StringIO()
    assert Watch(lambda: s, interval=5, sleep=sleep).run(out=out) == 0
    assert out.getvalue().endswith(R.SHOW_CURSOR + "\n")


def test_run_paces_with_the_clock():
    now = [100.0]
    slept = []
    s = make_snap()

    def fetch():
        now[0] += 0.25  # each fetch takes 0.25 s
        return s

    def sleep(d):
        slept.append(d)
        now[0] += d

    Watch(fetch, interval=1.0, clock=lambda: now[0], sleep=sleep).run(out=io.StringIO(), frames=3)
    assert slept == [pytest.approx(0.75), pytest.approx(0.75)]


def test_run_other_exceptions_still_restore_cursor():
    class Boom(io.StringIO):
        n = 0

        def write(self, x):
            self.n += 1
            if self.n == 2:
                raise BrokenPipeError
            return super().write(x)

    out = Boom()
    with pytest.raises(BrokenPipeError):
        Watch(lambda: make_snap(), interval=0).run(out=out, frames=1)
    assert out.getvalue().endswith(R.SHOW_CURSOR + "\n")


def test_frame_does_not_mutate_snapshots():
    a = make_snap()
    b = later(a, 2.0, {16: (10, 0)})
    a0, b0 = copy.deepcopy(a), copy.deepcopy(b)
    Watch(lambda: b).frame(a, b)
    stats_table(b, top=3)
    assert (a, b) == (a0, b0)
