"""Rendering of statistics snapshots for people (a table, a live view) and for scripts (JSON).

Pure functions over a snapshot dict (the `stats` reply, docs/PROTOCOL.md): no sockets, no daemon.  Every
figure's name, unit and help text come from the one declaration, shm.stats.FIELDS and META_FIELDS.

One module although it is over 400 lines: the table, the JSON and the live view share every helper
below (units, widths, rates), and the formatter's one-argument-per-line calls make up the length.

    human_bytes(n)              "0 B", "512 B", "1.5 MiB"
    human_count(n)              "999", "1.5k", "2.0M"
    human_value(v, unit)        a figure in its FIELDS unit, for people
    stats_table(snap, top=None) the `shmalloc stats` table (lines of at most WIDTH columns)
    stats_json(snap)            json.dumps(snap, sort_keys=True)
    rates(prev, cur)            allocations/s, frees/s, bytes allocated/s between two snapshots
    Watch(fetch, interval)      the live view: .frame(prev, cur) -> str, .run(out, frames) -> 0
"""

from __future__ import annotations

import datetime
import shutil
import sys
import textwrap
import time

from shm.stats import FIELDS, META_FIELDS, identities, monotonic

WIDTH = 100  # columns of stats_table and of a Watch frame (unless the terminal is narrower)
DASH = "\u2014"  # shown where a figure cannot be computed (first frame, counters reset)

CLEAR = "\x1b[H\x1b[2J"  # home the cursor, clear the screen
HOME = "\x1b[H"
CLEAR_EOL = "\x1b[K"
CLEAR_EOS = "\x1b[J"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"


# ----------------------------------------------------------------------------------------- units


def _scaled(v, base, units, fmt):
    """Scale |v| by `base` until it fits below base; never print e.g. '1024.0 KiB'."""
    sign = "-" if v < 0 else ""
    v = abs(v)
    i = 0
    while i < len(units) - 1 and (v >= base or float(fmt.format(v)) >= base):
        v /= base
        i += 1
    return sign, fmt.format(v), units[i]


def human_bytes(n) -> str:
    """Bytes for people, binary units: 0 -> '0 B', 512 -> '512 B', 1572864 -> '1.5 MiB'.
    Below 1 KiB the exact count; above, one decimal.  Negative values keep their sign."""
    if abs(n) < 1024:
        return f"{int(n) if float(n).is_integer() else round(n, 1)} B"
    sign, num, unit = _scaled(n / 1024, 1024, ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"), "{:.1f}")
    return f"{sign}{num} {unit}"


def human_count(n) -> str:
    """A count for people, SI suffixes: 999 -> '999', 1500 -> '1.5k', 2_000_000 -> '2.0M'.
    Floats (rates) below 1000 print as integers when whole, else with one decimal."""
    if abs(n) < 1000:
        if isinstance(n, int) or float(n).is_integer():
            return str(int(n))
        if abs(n) >= 100:
            return str(round(n)) if round(n) < 1000 else "1.0k"
        return f"{n:.1f}"
    sign, num, unit = _scaled(n / 1000, 1000, ("k", "M", "G", "T", "P", "E"), "{:.1f}")
    return f"{sign}{num}{unit}"


def human_ns(ns) -> str:
    """Nanoseconds as milliseconds: 420000 -> '0.420 ms'."""
    return f"{ns / 1e6:.3f} ms"


def human_value(v, unit) -> str:
    """A figure in its FIELDS unit (bytes, objects, count, ns, bool) for people."""
    if unit == "bytes":
        return human_bytes(v)
    if unit == "objects":
        return f"{human_count(v)} obj"
    if unit == "ns":
        return human_ns(v)
    if unit == "bool":
        return "yes" if v else "NO"
    return human_count(v)


def _truncate(s, width):
    if width <= 0:
        return ""
    return s if len(s) <= width else s[: max(width - 1, 0)] + "\u2026"


def _taken(snap) -> str:
    ns = snap.get("taken_ns")
    if not isinstance(ns, int) or ns <= 0:
        return "?"
    t = datetime.datetime.fromtimestamp(ns / 1e9)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{t.microsecond // 1000:03d}"


# -------------------------------------------------------------------------------------- sections


def _table(headers, rows, right=()):
    """Columns padded to their widest cell; indices in `right` right-aligned."""
    cols = [list(map(str, c)) for c in zip(headers, *rows)] if rows else [[h] for h in headers]
    widths = [max(map(len, c)) for c in cols]
    out = []
    for row in [headers, *rows]:
        cells = [
            str(x).rjust(w) if i in right else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths))
        ]
        out.append("  ".join(cells).rstrip())
    return out


def _wrap(text, width, indent="  "):
    return textwrap.wrap(
        text,
        width=width,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent]


def header_line(snap, title="shmalloc stats") -> list[str]:
    """The META_FIELDS of the snapshot (consistent yes / NO with the unflushed P slots and the
    locks not taken, epoch, pause in ms, num_p) and the time it was taken -- wrapped to WIDTH."""
    parts = [title]
    for name, unit, _kind, _help in META_FIELDS:
        v = snap.get(name)
        if name == "consistent":
            text = (
                "consistent: yes"
                if v
                else "consistent: NO (unflushed P slots: "
                + (", ".join(map(str, snap.get("unflushed") or [])) or "none listed")
                + "".join(
                    f"; lock {s['lock']} " + ("stranded" if s["stranded"] else "busy")
                    for s in snap.get("stuck_locks") or []
                )
                + ")"
            )
        else:
            label = name[:-3] if name.endswith("_ns") else name
            text = f"{label} {human_value(v, unit) if isinstance(v, int) else '?'}"
        parts.append(text)
    parts.append(f"taken {_taken(snap)}")
    lines = [parts[0]]
    for part in parts[1:]:  # wrap between parts, never inside one
        if len(lines[-1]) + 2 + len(part) <= WIDTH:
            lines[-1] += "  " + part
        else:
            lines += _wrap(part, WIDTH)
    return lines


def _identity_lines(snap) -> list[str]:
    try:
        bad = identities(snap)
    except (KeyError, TypeError) as e:
        return [f"identities: cannot check ({type(e).__name__}: {e})"]
    if not bad:
        return ["identities: all hold"]
    lines = [f"identities: {len(bad)} BROKEN"]
    for b in bad:
        lines += _wrap("- " + b, WIDTH)
    return lines


def _slow_lines(snap) -> list[str]:
    if "slow_equal" not in snap and not snap.get("slow_diff"):
        return []
    if snap.get("slow_equal") and not snap.get("slow_diff"):
        return ["slow span walk: equal, field for field"]
    diffs = snap.get("slow_diff") or []
    lines = [f"slow span walk: DIFFERS ({len(diffs)} field{'s' if len(diffs) != 1 else ''})"]
    for d in diffs:
        lines += _wrap("- " + str(d), WIDTH)
    return lines


def headline_lines(snap) -> list[str]:
    """The figures in FIELDS order: name, exact value, human value, help truncated to WIDTH."""
    rows = []
    for name, unit, _kind, _help in FIELDS:
        v = snap.get(name)
        rows.append(
            (
                name,
                f"{v:,}" if isinstance(v, int) else "?",
                human_value(v, unit) if isinstance(v, (int, float)) else "?",
            )
        )
    base = _table(("figure", "value", "human"), rows, right={1, 2})
    used = max(map(len, base)) + 2
    out = [base[0].ljust(used) + "meaning"]
    for line, (_name, _unit, _kind, help_) in zip(base[1:], FIELDS):
        out.append(line.ljust(used) + _truncate(help_, WIDTH - used))
    return out


def _used_classes(by_size):
    return [(c, e) for c, e in enumerate(by_size, 1) if e.get("mallocs", 0) > 0]


def size_class_lines(snap, top=None) -> list[str]:
    """Classes with mallocs > 0 in size order, or the `top` busiest by mallocs."""
    by = snap.get("by_size") or []
    used = _used_classes(by)
    if top is not None:
        used = sorted(used, key=lambda ce: (-ce[1]["mallocs"], ce[0]))[: max(top, 0)]
        title = (
            f"size classes: the {len(used)} busiest by mallocs ({len(_used_classes(by))} used of {len(by)})"
        )
    else:
        title = f"size classes: {len(used)} used of {len(by)}"
    rows = []
    for c, e in used:
        live = e["mallocs"] - e["frees"]
        rows.append(
            (
                c,
                human_bytes(e["size"]),
                f"{e['mallocs']:,}",
                f"{e['frees']:,}",
                f"{live:,}",
                human_bytes(live * e["size"]),
            )
        )
    lm, lf = snap.get("large_mallocs", 0), snap.get("large_frees", 0)
    if top is None and isinstance(lm, int) and lm > 0:
        rows.append(
            (
                "large",
                "> 32 KiB",
                f"{lm:,}",
                f"{lf:,}",
                f"{lm - lf:,}",
                human_bytes(snap.get("large_bytes", 0)),
            )
        )
    if not rows:
        return [title, "  (no allocations yet)"]
    return [title] + [
        "  " + r
        for r in _table(
            ("class", "size", "mallocs", "frees", "live", "live bytes"), rows, right={0, 1, 2, 3, 4, 5}
        )
    ]


def per_p_lines(snap) -> list[str]:
    """slot, pid, state, park time in µs, cached spans, listed objects returned."""
    ps = snap.get("per_p") or []
    title = f"Ps: {len(ps)}"
    if not ps:
        return [title, "  (no P took part in this snapshot)"]
    rows = [
        (
            p.get("slot", "?"),
            p.get("pid", "?"),
            p.get("state", "?"),
            f"{p['park_ns'] / 1000:,.1f}" if isinstance(p.get("park_ns"), int) else "?",
            p.get("cached_spans", "?"),
            p.get("listed_returned", "?"),
        )
        for p in sorted(ps, key=lambda p: p.get("slot", 0))
    ]
    return [title] + [
        "  " + r
        for r in _table(
            ("slot", "pid", "state", "park \u00b5s", "cached spans", "listed returned"),
            rows,
            right={0, 1, 3, 4, 5},
        )
    ]


# ---------------------------------------------------------------------------------------- public


def stats_table(snap, top=None) -> str:
    """The `shmalloc stats` table for people (see the module docstring)."""
    lines = header_line(snap)
    lines += [""] + headline_lines(snap)
    lines += [""] + _identity_lines(snap) + _slow_lines(snap)
    lines += [""] + size_class_lines(snap, top)
    lines += [""] + per_p_lines(snap)
    return "\n".join(lines) + "\n"


def stats_json(snap) -> str:
    """The snapshot for scripts."""
    import json

    return json.dumps(snap, sort_keys=True)


def rates(prev, cur):
    """(allocations/s, frees/s, bytes allocated/s) between two snapshots, from their taken_ns;
    None when there is no previous snapshot, no time passed, or a counter went backwards (the
    daemon restarted with a new arena)."""
    if prev is None or cur is None:
        return None
    try:
        dt = (cur["taken_ns"] - prev["taken_ns"]) / 1e9
        if dt <= 0 or monotonic(prev, cur):
            return None
        return (
            (cur["mallocs"] - prev["mallocs"]) / dt,
            (cur["frees"] - prev["frees"]) / dt,
            (cur["total_alloc"] - prev["total_alloc"]) / dt,
        )
    except (KeyError, TypeError):
        return None


def _rate(x, bytes_=False):
    if x is None:
        return DASH
    return (human_bytes(x) if bytes_ else human_count(x)) + "/s"


class Watch:
    """The live view: fetch a snapshot every `interval` seconds and redraw it in place.

    fetch()     returns a snapshot; may raise (the daemon may be restarting) -- the frame then
                shows the error and the last good figures, and the next interval tries again.
    clock/sleep injectable for tests (time.monotonic / time.sleep)."""

    def __init__(self, fetch, interval=1.0, *, top=10, clock=time.monotonic, sleep=time.sleep):
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.fetch = fetch
        self.interval = interval
        self.top = top
        self.clock = clock
        self.sleep = sleep

    # -- one frame

    def frame(self, prev, cur, error=None) -> str:
        """Headline figures of `cur`, rates since `prev` ('—' on the first frame), the `top`
        busiest classes by malloc rate, per-P lines.  `error`: a line to show at the top (cur is
        then the last good snapshot, or None)."""
        lines = []
        if cur is None:
            lines += ["shmalloc watch  (no snapshot yet)"]
        else:
            lines += header_line(cur, title="shmalloc watch")
        if error is not None:
            lines += _wrap(
                f"error: {error}"
                + ("  (figures below are from the last good snapshot)" if cur is not None else "")
                + "  -- retrying",
                WIDTH,
                indent="",
            )
        if cur is None:
            return "\n".join(lines) + "\n"
        r = rates(prev, cur) if error is None else None
        lines.append(
            "rates: allocations "
            + _rate(r and r[0])
            + "   frees "
            + _rate(r and r[1])
            + "   allocated "
            + _rate(r and r[2], bytes_=True)
            + (
                "   (counters reset: daemon restarted?)"
                if prev is not None and error is None and r is None and _reset(prev, cur)
                else ""
            )
        )
        lines.append("")
        cells = [
            f"{name} {human_value(cur[name], unit) if isinstance(cur.get(name), int) else '?'}"
            for name, unit, _k, _h in FIELDS
        ]
        w = max(map(len, cells)) + 3
        per = max(1, WIDTH // w)
        for i in range(0, len(cells), per):
            lines.append("".join(c.ljust(w) for c in cells[i : i + per]).rstrip())
        lines.append(_identity_lines(cur)[0])
        lines.append("")
        lines += self._busiest(prev if r is not None else None, cur, r is not None)
        lines.append("")
        lines += per_p_lines(cur)
        return "\n".join(lines) + "\n"

    def _busiest(self, prev, cur, have_rate):
        by = cur.get("by_size") or []
        if have_rate:
            dt = (cur["taken_ns"] - prev["taken_ns"]) / 1e9
            old = {e["size"]: e for e in prev.get("by_size") or []}
            ranked = []
            for c, e in enumerate(by, 1):
                o = old.get(e["size"], {"mallocs": 0, "frees": 0})
                dm = e["mallocs"] - o["mallocs"]
                if dm > 0:
                    ranked.append((dm / dt, (e["frees"] - o["frees"]) / dt, c, e))
            ranked.sort(key=lambda t: (-t[0], t[2]))
            title = f"busiest size classes by malloc rate (top {self.top})"
        else:
            ranked = sorted(
                ((None, None, c, e) for c, e in _used_classes(by)), key=lambda t: (-t[3]["mallocs"], t[2])
            )
            title = f"busiest size classes by mallocs (top {self.top}; rates from the next frame)"
        ranked = ranked[: self.top]
        if not ranked:
            return [title, "  (no allocations in the interval)" if have_rate else "  (no allocations yet)"]
        rows = [
            (
                c,
                human_bytes(e["size"]),
                _rate(mr),
                _rate(fr),
                f"{e['mallocs']:,}",
                f"{e['mallocs'] - e['frees']:,}",
                human_bytes((e["mallocs"] - e["frees"]) * e["size"]),
            )
            for mr, fr, c, e in ranked
        ]
        return [title] + [
            "  " + x
            for x in _table(
                ("class", "size", "mallocs/s", "frees/s", "mallocs", "live", "live bytes"),
                rows,
                right=set(range(7)),
            )
        ]

    # -- the loop

    def _width(self, out):
        try:
            if out.isatty():
                return shutil.get_terminal_size((WIDTH, 24)).columns
        except (AttributeError, ValueError, OSError):
            pass
        return None

    def run(self, out=None, frames=None) -> int:
        """Redraw every `interval` seconds until Ctrl-C (or `frames` frames).  Returns 0.
        The screen is cleared once; later frames home the cursor and overwrite in place (each line
        cleared to its end, the rest of the screen cleared below) so nothing flickers."""
        out = sys.stdout if out is None else out
        width = self._width(out)
        prev = None  # the last good snapshot
        n = 0
        out.write(HIDE_CURSOR + CLEAR)
        out.flush()
        try:
            deadline = self.clock()
            while frames is None or n < frames:
                try:
                    cur = self.fetch()
                    text = self.frame(prev, cur)
                    prev = cur
                except Exception as e:  # noqa: BLE001 -- the daemon may be restarting; keep going
                    text = self.frame(None, prev, error=f"{type(e).__name__}: {e}")
                lines = text.rstrip("\n").split("\n")
                if width:
                    lines = [_truncate(s, width) for s in lines]
                out.write(HOME + "".join(s + CLEAR_EOL + "\n" for s in lines) + CLEAR_EOS)
                out.flush()
                n += 1
                if frames is not None and n >= frames:
                    break
                deadline += self.interval
                delay = deadline - self.clock()
                if delay > 0:
                    self.sleep(delay)
                else:  # fell behind (slow fetch): pace from now, do not burst
                    deadline = self.clock()
        except KeyboardInterrupt:
            pass
        finally:
            out.write(SHOW_CURSOR + "\n")
            out.flush()
        return 0


def _reset(prev, cur):
    try:
        return bool(monotonic(prev, cur))
    except (KeyError, TypeError):
        return False
