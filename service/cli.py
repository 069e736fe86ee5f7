"""`shmalloc`: the command line.  See shm/__init__.py for the allocator's overview.

shmalloc daemon [--endpoint E] [--max-heap SIZE] ...   run the daemon in the foreground
shmalloc stats [--endpoint E] [--json] [--watch S]     a consistent snapshot (or a live view)
shmalloc check [--endpoint E]                          full span walk; exit 1 on any problem
shmalloc release [--endpoint E]                        give idle heap pages back to the OS
shmalloc shutdown [--endpoint E] [--force]             stop the daemon (--force: close the arena for good)
shmalloc cleanup [--endpoint E | --name N] [--force]   remove an arena a stopped or killed daemon left
shmalloc keys DIR [--name NAME]                        a CURVE key pair for tcp:// (NAME.key, NAME.key_secret)
shmalloc demo [--workers N] ...                        the daemon, N demo workers, a snapshot
"""

import argparse
import json
import sys

from client.curve import CurveKeyError
from shm.errors import ShmallocError


def _common(p):
    p.add_argument(
        "--endpoint",
        default=None,
        help="control endpoint (default: $SHMALLOC_ENDPOINT, else ipc://$XDG_RUNTIME_DIR/shmalloc/control.sock)",
    )


def _curve(p):
    """A client's CURVE keys, for a tcp:// endpoint whose daemon was started with them."""
    p.add_argument(
        "--curve-client-key",
        metavar="FILE",
        default=None,
        help="this client's secret certificate (NAME.key_secret of `shmalloc keys`), for a CURVE "
        "tcp:// endpoint (default: $SHMALLOC_CURVE_CLIENT_KEY)",
    )
    p.add_argument(
        "--curve-server-key",
        metavar="FILE",
        default=None,
        help="the daemon's public certificate (server.key), for a CURVE tcp:// endpoint "
        "(default: $SHMALLOC_CURVE_SERVER_KEY)",
    )


def _curve_of(args):
    """The `curve` argument of the client calls: the two files, or None (the environment's)."""
    client_key, server_key = args.curve_client_key, args.curve_server_key
    if client_key is None and server_key is None:
        return None
    if client_key is None or server_key is None:
        raise CurveKeyError("give both --curve-client-key and --curve-server-key, or neither")
    return (client_key, server_key)


def build_parser():
    ap = argparse.ArgumentParser(prog="shmalloc", description="malloc for a Python process pool")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("daemon", help="run the daemon in the foreground (SIGTERM/SIGINT: clean exit)")
    _common(d)
    d.add_argument(
        "--max-heap",
        default=None,
        help="heap size to reserve, e.g. 512M, 2G (default: half of /dev/shm's free space, 64 MiB..4 GiB)",
    )
    d.add_argument(
        "--name", default=None, help="arena segment name in /dev/shm (default: derived from the endpoint)"
    )
    d.add_argument(
        "--slots", type=int, default=64, help="maximum number of worker processes (P slots), at most 239"
    )
    d.add_argument(
        "--socket-mode", default="0600", help="mode of the ipc socket file, e.g. 0660 to let a group in"
    )
    d.add_argument(
        "--park-deadline-ms", type=int, default=2000, help="how long a snapshot waits for every P to park"
    )
    d.add_argument(
        "--min-stop-interval-ms",
        type=float,
        default=5,
        help="least time between two stops of the world for requests; stats requests waiting "
        "meanwhile share one pause (default 5)",
    )

    def budget(flag, default, text):
        d.add_argument(flag, nargs=2, type=float, metavar=("RATE", "BURST"), default=default, help=text)

    budget(
        "--refusal-budget",
        (200, 400),
        "refused requests a client gets answered at once: RATE a second, BURST in a row "
        "(default 200 400); beyond, each refusal is answered --tarpit-ms late",
    )
    budget("--global-refusal-budget", (1000, 2000), "the same for every client together (default 1000 2000)")
    budget(
        "--snapshot-budget",
        (20, 40),
        "stats requests one client (socket) may make at will: RATE a second, BURST in a row "
        "(default 20 40); beyond, its requests wait for a pause someone else asks for, or "
        "--tarpit-ms at most",
    )
    d.add_argument(
        "--tarpit-ms",
        type=float,
        default=250,
        help="how late a refusal beyond the budgets is answered (default 250)",
    )
    d.add_argument(
        "--insecure",
        action="store_true",
        help="allow a tcp:// endpoint on a non-loopback address without authentication",
    )
    d.add_argument(
        "--curve-server-key",
        metavar="FILE",
        default=None,
        help="tcp:// with CURVE: this daemon's secret certificate (server.key_secret of `shmalloc keys`); "
        "needs --curve-clients",
    )
    d.add_argument(
        "--curve-clients",
        metavar="DIR",
        default=None,
        help="tcp:// with CURVE: the directory of the public certificates (NAME.key) of the clients "
        "let in (read at start); they are trusted as ipc:// peers are",
    )
    d.add_argument(
        "--retain",
        default="5%",
        metavar="SIZE|PCT%",
        help="idle heap the background scavenger keeps committed for reuse, e.g. 64M, or a share of "
        "the heap's peak, e.g. 5%% (default); it gives the rest back to the OS by itself, in steps",
    )
    d.add_argument(
        "--metrics-addr",
        default=None,
        help="serve Prometheus /metrics on HOST:PORT (needs prometheus_client)",
    )
    d.add_argument(
        "--metrics-interval", type=float, default=5.0, help="seconds between the snapshots /metrics serves"
    )
    d.add_argument(
        "--slow-snapshot-ms", type=float, default=50, help="log snapshots whose pause is longer than this"
    )
    d.add_argument(
        "--no-realtime-pause",
        action="store_true",
        help="do not run the stop-the-world pause SCHED_FIFO (it does so by default where permitted)",
    )
    d.add_argument(
        "--no-ragged-flush",
        action="store_true",
        help="flush every cache inside the pause, not each P alone before it (the ragged round)",
    )
    d.add_argument("--log-format", choices=("text", "json"), default="text")
    d.add_argument("-v", "--verbose", action="store_true", help="log every snapshot")

    s = sub.add_parser("stats", help="print a consistent statistics snapshot")
    _common(s)
    s.add_argument("--json", action="store_true", help="JSON for scripts")
    s.add_argument(
        "--slow", action="store_true", help="also compare with a full span walk taken in the same pause"
    )
    s.add_argument(
        "--watch", type=float, metavar="SECONDS", default=None, help="live view, redrawn every SECONDS"
    )
    s.add_argument("--deadline-ms", type=int, default=2000)
    _curve(s)

    c = sub.add_parser("check", help="full span walk; exit 1 on any broken identity or structure")
    _common(c)
    _curve(c)

    r = sub.add_parser("release", help="give idle heap pages back to the OS (MADV_REMOVE)")
    _common(r)
    _curve(r)

    sd = sub.add_parser(
        "shutdown",
        help="stop the daemon as SIGTERM does: the arena is kept while live workers hold Ps "
        "(a daemon restarted on the endpoint adopts it)",
    )
    _common(sd)
    sd.add_argument(
        "--force",
        action="store_true",
        help="close the arena for good even under live workers: each one's next call raises ArenaClosed",
    )
    _curve(sd)

    cl = sub.add_parser("cleanup", help="remove the arena and socket a stopped or killed daemon left")
    _common(cl)
    cl.add_argument("--name", default=None)
    cl.add_argument(
        "--force",
        action="store_true",
        help="remove it even while live workers hold Ps in it: each one's next call raises ArenaClosed",
    )
    _curve(cl)

    k = sub.add_parser(
        "keys", help="make a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600)"
    )
    k.add_argument("dir", metavar="DIR", help="where to write the two files (made 0700 if missing)")
    k.add_argument(
        "--name", default="server", help='the files\' name: "server" for the daemon, one per client'
    )
    k.add_argument("--force", action="store_true", help="overwrite a key pair of that name")

    dm = sub.add_parser("demo", help="start a daemon, run demo workers on it, print a snapshot, stop")
    dm.add_argument("--workers", type=int, default=4)
    dm.add_argument("--ops", type=int, default=20000, help="alloc/free operations per worker")
    dm.add_argument("--max-heap", default="256M")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except ShmallocError as e:
        print(f"shmalloc {args.cmd}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_daemon(args):
    from .daemon import run

    return run(args)


def cmd_stats(args):
    import client

    from . import render

    curve = _curve_of(args)
    if args.watch:
        return render.Watch(
            lambda: client.stats(args.endpoint, args.deadline_ms, curve=curve), args.watch
        ).run()
    snap = client.stats(args.endpoint, args.deadline_ms, slow=args.slow, curve=curve)
    print(render.stats_json(snap) if args.json else render.stats_table(snap))
    return 0


def cmd_check(args):
    import client
    from shm.stats import identities

    res = client.check(args.endpoint, curve=_curve_of(args))
    problems = list(res["problems"]) + [f"identity: {p}" for p in identities(res["snapshot"])]
    if not res["snapshot"]["consistent"]:
        problems.append(f"snapshot not consistent: Ps {res['snapshot']['unflushed']} did not park")
    for p in problems:
        print(f"PROBLEM: {p}")
    print(
        f"check: {'OK' if not problems else f'{len(problems)} problem(s)'} "
        f"(epoch {res['snapshot']['epoch']}, {res['snapshot']['num_p']} Ps, "
        f"{res['snapshot']['heap_objects']} objects)"
    )
    return 1 if problems else 0


def cmd_release(args):
    import client

    n = client.request(args.endpoint, "release", 30000, curve=_curve_of(args))["released_bytes"]
    print(json.dumps({"released_bytes": n}))
    return 0


def cmd_shutdown(args):
    import client

    client.request(args.endpoint, "shutdown", 5000, curve=_curve_of(args), force=args.force)
    print("shutdown: asked" + (" (forced: the arena is closed for good)" if args.force else ""))
    return 0


def cmd_cleanup(args):
    import os

    import client
    from client.endpoint import arena_name_for, default_endpoint, ipc_path
    from shm.arena import unlink_segment

    endpoint = args.endpoint or default_endpoint()
    try:
        info = client.ping(endpoint, 500, curve=_curve_of(args))
        print(
            f"shmalloc cleanup: a daemon (pid {info['pid']}) is serving {endpoint}: stop it instead",
            file=sys.stderr,
        )
        return 1
    except client.DaemonUnavailable:
        pass
    name = args.name or arena_name_for(endpoint)
    # A daemon that did not answer (a CURVE daemon does not answer a stranger) may be alive all
    # the same: it holds its arena's daemon lock byte as long as it runs.
    pid = _daemon_holding(name)
    if pid is not None:
        print(
            f"shmalloc cleanup: /dev/shm/{name} is held by a live daemon (pid {pid}) that did not "
            f"answer at {endpoint}: stop it instead",
            file=sys.stderr,
        )
        return 1
    live = _close_unless_live(name, args.force)
    if live:
        print(
            f"shmalloc cleanup: /dev/shm/{name} is kept for {len(live)} live worker(s) (pids "
            f"{', '.join(map(str, live))}): a daemon started on {endpoint} adopts it; --force "
            "removes it all the same (their next call raises ArenaClosed)",
            file=sys.stderr,
        )
        return 1
    removed = []
    if unlink_segment(name):
        removed.append(f"/dev/shm/{name}")
    path = ipc_path(endpoint)
    if path and os.path.exists(path):
        os.unlink(path)
        removed.append(path)
    print("removed: " + (", ".join(removed) if removed else "nothing"))
    return 0


def cmd_keys(args):
    """zmq.auth.create_certificates, refusing to overwrite, the secret file made 0600."""
    import os

    import zmq
    import zmq.auth

    if not zmq.has("curve"):
        print("shmalloc keys: this libzmq was built without CURVE support", file=sys.stderr)
        return 2
    if os.sep in args.name or args.name in ("", ".", ".."):
        print(f"shmalloc keys: --name {args.name!r} is not a file name", file=sys.stderr)
        return 2
    public = os.path.join(args.dir, f"{args.name}.key")
    secret = public + "_secret"
    there = [p for p in (public, secret) if os.path.exists(p)]
    if there and not args.force:
        print(f"shmalloc keys: {', '.join(there)} exists (--force to overwrite)", file=sys.stderr)
        return 1
    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    old = os.umask(0o077)  # the secret is never readable by others, not even for a moment
    try:
        for p in there:
            os.unlink(p)
        public, secret = zmq.auth.create_certificates(args.dir, args.name)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)
    print(f"public:  {public}\nsecret:  {secret}")
    return 0


def _close_unless_live(name, force):
    """The pids of the live workers that hold Ps in arena `name` (nothing is changed then), or
    [] once it is closed for good: with `force` every live P is told first (its next call
    raises ArenaClosed).  [] too for a segment that is no arena of this version."""
    from shm import Arena
    from shm import layout as L
    from shm.world import close_for_good

    try:
        arena = Arena.attach(name)
    except (OSError, ShmallocError):
        return []
    try:
        why = L.CLOSED_CLEANUP if force else L.CLOSED_STOPPED
        live = close_for_good(arena, why, unless_live=not force)
        return [arena.registry.pid(k) for k in live] if not force else []
    finally:
        arena.close()


def _daemon_holding(name):
    """The pid in the header of arena `name` when a live daemon holds its lock byte, else None."""
    import os

    from shm import layout as L
    from shm.locks import ofd_held_elsewhere

    try:
        fd = os.open(f"/dev/shm/{name}", os.O_RDONLY)
    except OSError:
        return None
    try:
        if not ofd_held_elsewhere(fd, L.DAEMON_LOCK_BYTE):
            return None
        header = os.pread(fd, 8 * (L.HDR["daemon_pid"] + 1), 0)
        return int.from_bytes(header[-8:], "little") or "unknown"
    finally:
        os.close(fd)


def cmd_demo(args):
    from .demo import run

    return run(args)


COMMANDS = {
    "daemon": cmd_daemon,
    "stats": cmd_stats,
    "check": cmd_check,
    "release": cmd_release,
    "shutdown": cmd_shutdown,
    "cleanup": cmd_cleanup,
    "keys": cmd_keys,
    "demo": cmd_demo,
}
