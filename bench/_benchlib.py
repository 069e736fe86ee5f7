"""Plumbing shared by bench_sizes.py, bench_workloads.py and bench_handoff.py (not a benchmark).

- `Session`: a private daemon (its own temp dir and endpoint, `--max-heap 2G` by default, its
  log in the temp dir), the child processes and Ray, and the cleanup of all of it -- on a normal
  exit, an error, Ctrl-C or SIGTERM: children terminated, Ray shut down, the daemon stopped
  (SIGTERM: it unlinks its arena, or keeps it while a Heap of this process is open), then
  anything left in /dev/shm under this run's names (the arena, `<prefix>*`: SharedMemory
  segments and iceoryx2's files) removed.
- `have(module)` / `skipped(peer)`: the optional peers of the `bench` extra.
- `header()`, `md_table()`, `fmt_*()`: the command line, the machine, markdown tables.
- `pattern(handle, size)`: the fill pattern of the workloads (the handle's 8 bytes repeated).
"""

import importlib.util
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

SHM_DIR = "/dev/shm"


# ---------------------------------------------------------------------------------------------
# peers


def have(module):
    """True if `module` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def skipped(peer):
    print(f"skipped: {peer} not installed (pip install -e '.[bench]')", flush=True)


# ---------------------------------------------------------------------------------------------
# sizes, numbers, tables

_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
}


def parse_size(text):
    """'64', '4K', '4KiB', '1M', '64 MiB' -> bytes (K/M/G are binary)."""
    t = text.strip().upper().replace(" ", "")
    i = len(t)
    while i and not t[i - 1].isdigit():
        i -= 1
    return int(t[:i]) * _UNITS[t[i:]]


def parse_sizes(text):
    return [parse_size(x) for x in text.split(",") if x.strip()]


def fmt_size(n):
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def fmt_num(x, digits=0):
    """12345.6 -> '12 346' (the grouping of docs/PERFORMANCE.md)."""
    if x is None:
        return "–"
    return f"{x:,.{digits}f}".replace(",", " ")


def fmt_ratio(x):
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}×"
    if x >= 10:
        return f"{x:.1f}×"
    return f"{x:.2f}×"


def median(xs):
    return statistics.median(xs) if xs else None


def count_calls(obj, name):
    """Wrap method `name` of `obj` in place -- for one the allocator looks up at each call, as
    its slow paths do theirs -- so that every call adds 1 and its nanoseconds to the list this
    returns, [calls, ns] (reset it in place).  Every argument is passed on, whatever the
    method's signature."""
    fn, acc = getattr(obj, name), [0, 0]

    def call(*args, **kw):
        t = time.perf_counter_ns()
        try:
            return fn(*args, **kw)
        finally:
            acc[0] += 1
            acc[1] += time.perf_counter_ns() - t

    setattr(obj, name, call)
    return acc


def recv_from(conn, proc, timeout=60):
    """The next message of a child process on `conn`: ("error", traceback) raised here as a
    RuntimeError, and so are the child's death and `timeout` seconds of silence."""
    deadline = time.monotonic() + timeout
    while not conn.poll(0.2):
        if not proc.is_alive():
            raise RuntimeError(f"child pid {proc.pid} died (exit {proc.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from child pid {proc.pid} within {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"child pid {proc.pid} failed:\n{msg[1]}")
    return msg


def pct(xs, p):
    """Nearest-rank percentile (p in 0..1) of `xs`; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[max(1, math.ceil(p * len(xs))) - 1]


def ratio(a, b):
    return a / b if a is not None and b else None


def md_table(headers, rows, right=None):
    """A markdown table; columns are right-aligned except the first (or as `right` says)."""
    right = right if right is not None else [False] + [True] * (len(headers) - 1)
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(out)


def cpu_model():
    """The CPU's model name from /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def git_revision():
    """`git describe --always --dirty` of the repository ("" outside one)."""
    try:
        return subprocess.run(
            ["git", "-C", REPO, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def header(title):
    """The command line and the machine, as a markdown preamble."""
    cpu, rev = cpu_model(), git_revision()
    cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:])
    lines = [
        f"### {title}",
        "",
        "```sh",
        cmd,
        "```",
        "",
        f"machine: nproc {os.cpu_count()}, {cpu or platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()}; code {rev or '?'}; {time.strftime('%Y-%m-%d %H:%M')}",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the workloads' fill pattern


def pattern(handle, size):
    """`size` bytes: the handle's 8 bytes (little-endian) repeated."""
    return (handle.to_bytes(8, "little") * ((size >> 3) + 1))[:size]


# ---------------------------------------------------------------------------------------------
# the session: daemon, children, peers' resources, cleanup


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def child_init():
    """Call first in every child process: Ctrl-C in the terminal reaches the whole process group;
    the parent alone handles it (and terminates the children)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start_daemon(endpoint, max_heap, log_path, extra=(), env=None, preexec_fn=None, ping_ms=200):
    """`python -m service daemon` of this tree on `endpoint`, its output in `log_path`, in a
    session of its own (a Ctrl-C in the terminal does not reach it); returns the Popen once it
    answers a ping.  RuntimeError with the log's tail if it exits or stays silent for 30 s."""
    import client
    from service.demo import daemon_command

    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            daemon_command(endpoint, max_heap, extra),
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec_fn,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            client.ping(endpoint, ping_ms)
            return proc
        except client.DaemonUnavailable:
            if proc.poll() is not None or time.monotonic() > deadline:
                try:
                    with open(log_path, errors="replace") as f:
                        tail = f.read()[-4000:]
                except OSError:
                    tail = ""
                raise RuntimeError(f"the daemon did not start (exit {proc.poll()}):\n{tail}") from None
            time.sleep(0.05)


class Session:
    """with Session(max_heap="2G", extra=("--retain", "0")) as s: s.endpoint, s.tmp, s.prefix, s.spawn(...), s.ray_init()."""

    def __init__(self, max_heap="2G", daemon=True, extra=()):
        self.max_heap = max_heap
        self.extra = list(extra)  # more daemon options
        self.want_daemon = daemon
        self.tmp = tempfile.mkdtemp(prefix="shmalloc-bench-")
        # Every /dev/shm name this run makes (besides the arena) starts with this.
        self.prefix = f"shmb{os.getpid()}x"
        self.endpoint = f"ipc://{self.tmp}/control.sock"
        self.daemon = None
        self.arena = None
        self.procs = []
        self.ray = None
        self._old_term = None

    # -- lifecycle
    def __enter__(self):
        self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            if self.want_daemon:
                self.start_daemon()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def start_daemon(self):
        import client

        self.daemon = start_daemon(
            self.endpoint, self.max_heap, os.path.join(self.tmp, "daemon.log"), self.extra
        )
        self.arena = client.ping(self.endpoint, 200).get("arena")

    def daemon_log(self, tail=4000):
        try:
            with open(os.path.join(self.tmp, "daemon.log"), errors="replace") as f:
                return f.read()[-tail:]
        except OSError:
            return ""

    def spawn(self, target, args=(), name=None):
        """Start a child process (spawn context), remembered for cleanup."""
        import multiprocessing as mp

        p = mp.get_context("spawn").Process(target=target, args=args, name=name, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def ray_init(self, object_store_mb=200):
        """ray.init with one CPU, a small object store, no dashboard, its files in our temp dir.

        Ray's processes are grandchildren (raylet's children), orphaned if raylet dies first (a
        Ctrl-C reaches the whole process group): this process becomes their subreaper, so that
        close() still finds them, as its descendants.  ray.init installs its own SIGTERM
        handlers (one aborts the process): ours are put back."""
        import ray

        self.ray = ray  # close() calls ray.shutdown() even if ray.init is interrupted
        _set_subreaper()
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            ray.init(
                num_cpus=1,
                object_store_memory=object_store_mb << 20,
                include_dashboard=False,
                log_to_driver=False,
                logging_level="ERROR",
                _temp_dir=os.path.join(self.tmp, "ray"),
                configure_logging=True,
            )
        finally:
            signal.signal(signal.SIGTERM, _raise_interrupt)
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return ray

    def iceoryx2_config(self):
        """(prefix, root_path) for iceoryx2: every file it makes is then ours by name."""
        return self.prefix + "iox_", os.path.join(self.tmp, "iox2") + "/"

    def close(self):
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs = []
        if self.ray is not None:
            try:
                self.ray.shutdown()
            except Exception as e:  # noqa: BLE001 - cleanup goes on
                print(f"warning: ray.shutdown: {e}", file=sys.stderr)
            self.ray = None
            swept = _sweep_descendants(exclude=self.daemon.pid if self.daemon else None)
            if swept:
                print(f"cleanup: ended {swept} leftover Ray process(es)", file=sys.stderr)
        if self.daemon is not None:
            if self.daemon.poll() is None:
                self.daemon.terminate()
                try:
                    self.daemon.wait(30)
                except subprocess.TimeoutExpired:
                    self.daemon.kill()
                    self.daemon.wait(10)
            self.daemon = None
        left = []
        try:
            names = os.listdir(SHM_DIR)
        except OSError:
            names = []
        for name in names:
            if name.startswith(self.prefix) or (self.arena and name == self.arena):
                try:
                    os.unlink(os.path.join(SHM_DIR, name))
                except OSError:
                    continue
                if name.startswith(self.prefix) and not name.startswith(self.prefix + "iox_"):
                    _forget_shared_memory(name)
                # iceoryx2 leaves its global management file behind by design: expected.
                if not name.endswith(".global_mgmt"):
                    left.append(name)
        if left:
            print(
                f"cleanup: removed {len(left)} /dev/shm entries the ended processes left "
                f"({self.prefix}*{', the arena' if self.arena in left else ''})",
                file=sys.stderr,
            )
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)
        if self._old_term is not None:
            signal.signal(signal.SIGTERM, self._old_term)
            self._old_term = None


def _forget_shared_memory(name):
    """A SharedMemory segment we unlinked: the resource tracker need not (nor warn at exit)."""
    try:
        from multiprocessing import resource_tracker

        resource_tracker.unregister("/" + name, "shared_memory")
    except Exception:  # noqa: BLE001 - cosmetic
        pass


def _set_subreaper():
    """prctl(PR_SET_CHILD_SUBREAPER): orphaned descendants are re-parented to this process."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _proc_table():
    """{pid: (ppid, state)} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    rest = f.read().rsplit(")", 1)[1].split()
                out[int(d)] = (int(rest[1]), rest[0])
            except (OSError, ValueError, IndexError):
                pass
    return out


def _descendants(pid, table):
    kids = {}
    for p, (pp, _) in table.items():
        kids.setdefault(pp, []).append(p)
    out, stack = [], [pid]
    while stack:
        for c in kids.get(stack.pop(), ()):
            out.append(c)
            stack.append(c)
    return out


def _sweep_descendants(exclude=None, timeout=5.0):
    """End every descendant of this process but the daemon and multiprocessing's resource
    tracker (Ray's leftovers), by pid: SIGTERM, then SIGKILL after `timeout`; reap the zombies
    re-parented to us.  Returns how many were alive."""
    me = os.getpid()
    skip = {exclude}
    try:
        from multiprocessing import resource_tracker

        skip.add(resource_tracker._resource_tracker._pid)
    except (ImportError, AttributeError):
        pass
    seen, sig, deadline = set(), signal.SIGTERM, time.monotonic() + timeout
    while True:
        table = _proc_table()
        live = []
        for p in _descendants(me, table):
            if p in skip:
                continue
            if table[p][1] == "Z":
                if table[p][0] == me:
                    try:
                        os.waitpid(p, os.WNOHANG)
                    except ChildProcessError:
                        pass
            else:
                live.append(p)
        if not live:
            return len(seen)
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for p in live:
            seen.add(p)
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# a child process that runs commands sent by the parent


def serve(ctl, handlers, setup=None):
    """The loop of a worker child: receive (name, kwargs) on `ctl`, run handlers[name](**kwargs),
    send back ("ok", result) or ("error", traceback text).  ("quit", {}) ends it."""
    import traceback

    state = setup() if setup else None
    try:
        while True:
            try:
                name, kwargs = ctl.recv()
            except EOFError:
                return
            if name == "quit":
                ctl.send(("ok", None))
                return
            try:
                ctl.send(("ok", handlers[name](state, **kwargs)))
            except Exception:  # noqa: BLE001 - reported to the parent
                ctl.send(("error", traceback.format_exc()))
    finally:
        if state is not None and hasattr(state, "close"):
            state.close()


class WorkerError(RuntimeError):
    pass


def call(ctl, name, **kwargs):
    """Send one command (see `serve`); `result(ctl)` collects its answer."""
    ctl.send((name, kwargs))


def result(ctl, timeout=600):
    if not ctl.poll(timeout):
        raise WorkerError(f"no answer from a worker within {timeout} s")
    status, value = ctl.recv()
    if status != "ok":
        raise WorkerError(value)
    return value


def stop_pool(pool):
    """Stop worker processes given as [(process, pipe)]: ask each to quit, give them 3 s, then
    terminate, then kill; close the pipes."""
    for _p, conn in pool:
        try:
            conn.send(("quit",))
        except OSError:
            pass
    deadline = time.monotonic() + 3
    for p, _ in pool:
        p.join(max(0.0, deadline - time.monotonic()))
    for p, _ in pool:
        if p.is_alive():
            p.terminate()
    for p, conn in pool:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
        conn.close()
