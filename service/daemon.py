"""The shmalloc daemon: owns the arena, serves the control channel, stops the world for
consistent snapshots, reclaims dead Ps.  See shm/__init__.py for the allocator's overview and
docs/ARCHITECTURE.md for the processes.

Life cycle:
  start      resolve the endpoint; refuse if a daemon answers there; create the arena (or adopt
             the one a killed daemon left: see `open_arena`); bind a ROUTER socket (ipc: socket
             file mode 0600 unless --socket-mode); log "started".
  serve      one thread: poll the socket; every request is one op of client/ops, handled in
             service/handlers.py (the daemon never dies of a request); every LIVENESS_S: reclaim
             Ps whose process died.
  snapshot   stop every live P (shm/world.py: from the daemon's side for a P outside the
             allocator, a STOP message to the control thread where membarrier is missing), flush
             every cache FIRST, then read the figures, then resume -- see `snapshot`.
  stop       SIGTERM / SIGINT / `shutdown`: park and flush one last time, remove the socket
             file, exit 0.  The segment is unlinked when no live worker holds a P; with live
             workers it is kept for them (their blocks and handles stay valid), and a daemon
             restarted on the endpoint adopts it.  A forced shutdown closes it for good: every
             live P is told (shm/world.py close_for_good) and its next call raises ArenaClosed.

The pause itself is service/pause.py (and its handshake shm/world.py), the log service/logs.py.
This module is one class and its entry point, over 400 lines because the Daemon's methods are
the bodies of the ops (register, heartbeat, stats, check, ...) beside the loop that serves them:
each reads best next to the state it changes.
"""

import collections
import logging
import math
import os
import signal
import time

import zmq
import zmq.auth

from client import protocol
from client.endpoint import arena_name_for, default_endpoint, ipc_path
from shm import Arena, stats
from shm import layout as L
from shm.arena import unlink_segment
from shm.errors import (
    Forbidden,
    ForeignReference,
    LayoutMismatch,
    LockUnavailable,
    NotRegistered,
    ProtocolError,
    ShmallocError,
    StartupError,
)
from shm.locks import ofd_lock, ofd_trylock, ofd_unlock
from shm.world import StopTheWorld, close_for_good

from .handlers import answer
from .intake import REFUSALS, Budgets, Intake
from .logs import event, setup_logging
from .pause import StoppedWorld, not_quiet, set_realtime
from .scavenger import DEFAULT_RETAIN, Scavenger, parse_retain
from .security import LogLimiter, check_segment, endpoint_id, prepare_dir

LIVENESS_S = 0.1  # how often dead Ps are looked for (reclaimed within a second)
EMPTY_SPANS_S = 1.0  # how often empty spans waiting on central lists go back to the heap
HEARTBEAT_MS = 1000  # how often workers send a heartbeat
LOCK_WAIT_S = 0.1  # the longest the daemon waits for an arena lock: its loop must keep answering
RECLAIM_RETRY_S = 1.0  # a reclaim that could not take a lock in time is tried again this much later
DAEMON_LOCK_BYTE = L.DAEMON_LOCK_BYTE
INTAKE_BATCH = 32  # requests read per wake-up of the serve loop, at most
MAX_LATE = 16384  # stats requests waiting beyond their client's budget; more are served as usual
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.NOBLOCK | zmq.SNDMORE)


# --- sizes -----------------------------------------------------------------------------------
def parse_size(text):
    """'512M', '1G', '64MiB', '1048576' -> bytes, rounded down to whole pages."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        n = int(float(t[:-1]) * mult[t[-1]]) if t and t[-1] in mult else int(t)
    except ValueError:
        raise StartupError(f"not a size: {text!r} (say 512M, 2G, or a number of bytes)") from None
    if n < L.PAGE_SIZE:
        raise StartupError(f"--max-heap {text!r} is less than one {L.PAGE_SIZE}-byte page")
    return n // L.PAGE_SIZE * L.PAGE_SIZE


def default_max_heap():
    """Half of what /dev/shm can hold, between 64 MiB and 4 GiB."""
    try:
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = 1 << 30
    return max(64 << 20, min(4 << 30, free // 2)) // L.PAGE_SIZE * L.PAGE_SIZE


# --- CURVE ---------------------------------------------------------------------------------------
def load_curve(endpoint, server_key, clients):
    """--curve-server-key FILE (the daemon's secret certificate) and --curve-clients DIR (the
    public certificates of the clients let in), both or neither, for a tcp:// endpoint only:
    (public, secret) of the daemon and DIR, or (None, None).  StartupError saying what is wrong."""
    if server_key is None and clients is None:
        return None, None
    if server_key is None or clients is None:
        raise StartupError("CURVE needs both --curve-server-key FILE and --curve-clients DIR")
    if not endpoint.startswith("tcp://"):
        raise StartupError(
            f"--curve-server-key/--curve-clients are for tcp:// endpoints; {endpoint} is not one "
            "(an ipc:// socket is guarded by its file mode: see --socket-mode)"
        )
    if not zmq.has("curve"):
        raise StartupError("CURVE asked for, but this libzmq was built without CURVE support")
    try:
        public, secret = zmq.auth.load_certificate(server_key)
    except (OSError, ValueError) as e:
        raise StartupError(f"--curve-server-key: cannot read {server_key}: {e}") from None
    if not secret:
        raise StartupError(
            f"--curve-server-key: {server_key} holds no secret key (give the server's "
            "NAME.key_secret file that `shmalloc keys` wrote, not its public NAME.key)"
        )
    if not os.path.isdir(clients) or not os.access(clients, os.R_OK | os.X_OK):
        raise StartupError(f"--curve-clients: {clients} is not a readable directory")
    try:
        allowed = zmq.auth.load_certificates(clients)
    except (OSError, ValueError) as e:
        raise StartupError(f"--curve-clients: cannot read the certificates in {clients}: {e}") from None
    if not allowed:
        raise StartupError(
            f"--curve-clients: {clients} holds no public certificate (NAME.key): no client could "
            "connect; make one with `shmalloc keys DIR --name NAME` and copy its NAME.key there"
        )
    return (public, secret), os.path.abspath(clients)


# --- the daemon ------------------------------------------------------------------------------
class Daemon:
    def __init__(
        self,
        endpoint=None,
        max_heap=None,
        name=None,
        nslots=64,
        socket_mode=0o600,
        park_deadline_ms=2000,
        metrics_addr=None,
        metrics_interval=5.0,
        slow_snapshot_ms=50,
        realtime_pause=True,
        ragged_flush=True,
        min_stop_interval_ms=5,
        insecure=False,
        curve_server_key=None,
        curve_clients=None,
        retain=DEFAULT_RETAIN,
        refusal_budget=(200, 400),
        global_refusal_budget=(1000, 2000),
        tarpit_ms=250,
        snapshot_budget=(20, 40),
    ):
        self.retain = retain
        parse_retain(retain)  # a bad --retain is refused before anything is made
        self.scavenger = None
        self.endpoint = endpoint or default_endpoint()
        self.max_heap = max_heap or default_max_heap()
        self.name = name or arena_name_for(self.endpoint)
        self.nslots = nslots
        self.socket_mode = socket_mode
        self.arena_mode = 0o600 | (socket_mode & 0o060)  # the most an adopted segment may give
        self.park_deadline_ms = park_deadline_ms
        self.slow_snapshot_ms = slow_snapshot_ms  # longer pauses are logged at WARNING
        # The pause runs SCHED_FIFO where the daemon may (CAP_SYS_NICE): a flush preempted by a
        # busy worker lengthens every other worker's wait.  Checked once at start.
        self.realtime_pause = realtime_pause and set_realtime(True) and set_realtime(False)
        # Each P's cache flushed alone before the stop, while the others run (service/pause.py).
        self.ragged_flush = ragged_flush
        self.metrics_addr = metrics_addr
        self.metrics_interval = metrics_interval
        self.routes = {}  # slot -> zmq routing id of its P's control socket
        self.deferred = collections.deque()  # heavy requests that arrived while the world was stopped
        self.started = time.monotonic()
        self.stopping = False
        self.force = False  # a forced shutdown: close the arena for good even under live workers
        self.arena = None
        self.sock = None
        self.ctx = None
        self.metrics = None
        self.last_snapshot = None
        self.prev_counters = None
        self.adopted = False
        self.insecure = insecure  # a non-loopback tcp:// bind without CURVE was asked for
        self.curve = None  # the CURVE authenticator, when tcp:// clients must prove a key
        # CURVE (tcp:// only): this daemon's keys, and the directory of the clients' public keys.
        self.curve_keys, self.curve_clients = load_curve(self.endpoint, curve_server_key, curve_clients)
        # No stop of the world on demand for free: stats requests waiting together share one
        # pause; two pauses for requests are at least min_stop_interval_ms apart (a check's at
        # least its own length apart); a request's deadline is capped at park_deadline_ms.
        self.min_stop_interval = min_stop_interval_ms / 1000
        self.waiting = {"stats": [], "check": []}  # (identity, frame, request) per heavy op
        self.next_stop = {"stats": 0.0, "check": 0.0}  # time.monotonic() a batch may run from
        self.shared = {}  # op -> the result the batch being answered shares
        self.refusals = LogLimiter()  # refused requests and malformed messages, rate-limited
        self.reclaim_at = {}  # slot -> time.monotonic() its deferred reclaim is tried again
        self.stuck_seen = set()  # (lock, holder pid, stranded) already logged
        # What refusals may cost (service/intake.py): (rate a second, burst) per client and for
        # everyone together; beyond them a refusal is sent tarpit_ms late.
        self.intake = Intake(*refusal_budget, *global_refusal_budget, tarpit_ms / 1000)
        # stats requests a client may make at will (rate a second, burst); beyond, a request
        # waits in `late` for a pause someone else asks for, or tarpit_ms at most.
        self.snapshot_budget = Budgets(*snapshot_budget)
        self.late = collections.deque()  # (due, envelope, frame, request), due nondecreasing

    # --- start -------------------------------------------------------------------------
    def start(self):
        path = ipc_path(self.endpoint)
        if path:
            prepare_dir(os.path.dirname(path) or ".", self.socket_mode)
        self._refuse_if_served()
        self.arena = self.open_arena()
        self.stw = StopTheWorld(self.arena)
        self.scavenger = Scavenger(self.arena, self.retain, realtime=self.realtime_pause)
        try:
            self.bind()
            if self.metrics_addr:
                from .metrics import MetricsServer

                self.metrics = MetricsServer(self, self.metrics_addr).start()
        except BaseException:
            self._close_socket()
            self._release_arena(unlink=not self.adopted)
            raise
        event(
            logging.INFO,
            "started",
            pid=os.getpid(),
            endpoint=self.endpoint,
            arena=self.name,
            max_heap=self.max_heap,
            adopted=self.adopted,
            metrics=self.metrics.url if self.metrics else "-",
            stop_protocol=self.stw.protocol,
            realtime_pause=self.realtime_pause,
            ragged_flush=self.ragged_flush,
            retain=self.retain,
        )
        if not self.stw.asymmetric:
            event(
                logging.WARNING,
                "membarrier(2) unavailable: stopping the world the cooperative way "
                "(each P's control thread parks it; pauses wait for the workers' GIL)",
            )

    def _refuse_if_served(self):
        """A daemon that answers on the endpoint keeps it; a stale socket file is removed."""
        path = ipc_path(self.endpoint)
        if path and not os.path.exists(path):
            return
        from client import DaemonUnavailable, ping

        try:
            info = ping(self.endpoint, timeout_ms=500)
        except DaemonUnavailable:
            if path:
                event(logging.WARNING, "removed stale socket", path=path)
                os.unlink(path)
            return
        raise StartupError(
            f"another shmalloc daemon (pid {info['pid']}) is serving {self.endpoint}; "
            "stop it first, or pass another --endpoint"
        )

    def open_arena(self):
        """Create the arena, or adopt the one a killed daemon left under the same name, or a
        stopped one kept for its live workers (they kept allocating; their blocks stay valid).
        A segment held by a live daemon, or of another layout, is refused with a message saying
        what to do; one closed for good is removed and replaced."""
        path = f"/dev/shm/{self.name}"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            # Judged before it is mapped, then again on the open file (it may have been swapped).
            check_segment(st, path, self.arena_mode)
            try:
                arena = Arena.attach(self.name)
            except LayoutMismatch as e:
                raise StartupError(
                    f"{path} exists but is not an arena of this version ({e}); "
                    f"remove it with: shmalloc cleanup --name {self.name}"
                ) from None
            try:
                check_segment(os.fstat(arena.fd), path, self.arena_mode)
                if arena.q[L.HDR["endpoint_id"]] != endpoint_id(self.endpoint):
                    raise StartupError(
                        f"{path} is an arena, but not one a shmalloc daemon made for {self.endpoint}: "
                        f"not adopted (remove it with: shmalloc cleanup --name {self.name})"
                    )
            except BaseException:
                arena.close()
                raise
            if not ofd_trylock(arena.fd, DAEMON_LOCK_BYTE):
                arena.close()
                raise StartupError(
                    f"arena {self.name} is served by a live daemon (pid "
                    f"{arena.q[L.HDR['daemon_pid']]}) that does not answer on {self.endpoint}"
                )
            if arena.q[L.HDR["closed"]]:
                # Closed for good, its closer gone before it unlinked it: nobody may use it again.
                event(logging.WARNING, "removed an arena closed for good", arena=self.name)
                arena.close()
                unlink_segment(self.name)
                st = None
        if st is not None:
            self.adopted = True
            arena.locks.wait_s = LOCK_WAIT_S
            repaired, dead = [], []
            for k in arena.registry.actors():
                try:
                    if arena.locks.repair(k):
                        repaired.append(k)
                    if (
                        k < arena.lay.nslots
                        and k in arena.registry.active_slots()
                        and not arena.registry.alive(k)
                    ):
                        arena.reclaim(k, arena.daemon_actor)
                        dead.append(k)
                except LockUnavailable as e:  # the serve loop's reclaim tries again
                    self._lock_unavailable(e, slot=k)
            # A P parked for the previous daemon's stop waits for a resume nobody will send:
            # resume it (RESYNC: that daemon may have flushed its cache already).
            stale = [
                k
                for k in arena.registry.active_slots()
                if arena.q[arena.lay.slot_word(k) + L.SLOT["stop"]] == L.STOP_PARK
            ]
            for k in stale:
                arena.q[arena.lay.slot_word(k) + L.SLOT["stop"]] = L.STOP_RESYNC
            arena.q[L.HDR["stopped_epoch"]] = 0
            kept_by, arena.q[L.HDR["kept_by"]] = arena.q[L.HDR["kept_by"]], 0
            event(
                logging.WARNING,
                "adopted arena left by a previous daemon",
                arena=self.name,
                previous_pid=kept_by or arena.q[L.HDR["daemon_pid"]],
                previous="stopped, kept for its live workers" if kept_by else "killed",
                repaired=repaired,
                reclaimed=dead,
                resumed=stale,
                live_ps=len(arena.registry.active_slots()),
            )
        else:
            self._check_room()
            # O_CREAT|O_EXCL, mode 0600: a segment someone made meanwhile is refused, not shared.
            arena = Arena.create(self.name, self.max_heap, self.nslots)
            # The segment is as open as the socket: a group let into the socket (--socket-mode
            # 0660) must be able to map the arena too.
            os.fchmod(arena.fd, self.arena_mode)
            arena.q[L.HDR["endpoint_id"]] = endpoint_id(self.endpoint)
            ofd_lock(arena.fd, DAEMON_LOCK_BYTE)
        arena.locks.wait_s = LOCK_WAIT_S
        arena.q[L.HDR["daemon_pid"]] = os.getpid()
        return arena

    def _check_room(self):
        st = os.statvfs("/dev/shm")
        free = st.f_bavail * st.f_frsize
        if self.max_heap > free:
            raise StartupError(
                f"--max-heap {self.max_heap} bytes is more than /dev/shm has free ({free} bytes); "
                "lower --max-heap, or give /dev/shm more room (Docker: --shm-size)"
            )

    def bind(self):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME * 2)
        path = ipc_path(self.endpoint)
        if path:
            old = os.umask(0o777 & ~self.socket_mode)
            try:
                self.sock.bind(self.endpoint)
            finally:
                os.umask(old)
            os.chmod(path, self.socket_mode)
        else:
            if self.curve_keys is not None:
                self._start_curve()
            host = self.endpoint.partition("://")[2].rpartition(":")[0].strip("[]")
            loopback = host == "localhost" or host == "::1" or host.startswith("127.")
            if not loopback and self.curve is None:
                if not self.insecure:
                    raise StartupError(
                        f"{self.endpoint} is not a loopback address: anyone who reaches it could "
                        "watch the control channel and, with a sniffed slot token, act for a "
                        "worker -- use an ipc:// endpoint or 127.0.0.1, or pass --insecure to "
                        "bind it anyway"
                    )
                event(logging.WARNING, "control channel open to the network without authentication")
            try:
                self.sock.bind(self.endpoint)
            except zmq.ZMQError as e:
                raise StartupError(f"cannot bind {self.endpoint}: {e}") from None

    def _start_curve(self):
        """The ROUTER a CURVE server with this daemon's key; a ZAP authenticator (a thread on
        the same Context) lets in only the clients whose public key is in --curve-clients:
        zmq drops any other peer during the handshake -- it never gets an answer."""
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(self.ctx)
        auth.start()
        self.curve = auth  # set at once: _close_socket stops it should anything below fail
        auth.configure_curve(domain="*", location=self.curve_clients)
        public, secret = self.curve_keys
        self.sock.curve_secretkey = secret
        self.sock.curve_publickey = public
        self.sock.curve_server = True
        event(
            logging.INFO,
            "CURVE authentication on",
            clients=self.curve_clients,
            keys=len(auth.certs.get("*", {})),
        )

    # --- serve -------------------------------------------------------------------------
    def serve(self):
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        next_scan = next_empty = next_metrics = time.monotonic()
        while not self.stopping:
            now = time.monotonic()
            timeout = LIVENESS_S
            for op, batch in self.waiting.items():
                if batch:
                    timeout = min(timeout, max(0.0, self.next_stop[op] - now))
            timeout = min(timeout, self.scavenger.wait(now))
            for due in (self.intake.next_due, self.late[0][0] if self.late else None):
                if due is not None:
                    timeout = min(timeout, max(0.0, due - now))
            if self.deferred or poller.poll(math.ceil(timeout * 1000)):
                # A few requests per wake-up: a flood pays one poll per INTAKE_BATCH requests.
                # They are still read in the ROUTER's fair-queued order, one peer after another.
                for _ in range(INTAKE_BATCH):
                    if not self.handle_one() or self.stopping:
                        break
            for env, reply in self.intake.due():
                self._reply(env, reply)
            now = time.monotonic()
            while self.late and self.late[0][0] <= now:  # waited long enough: a pause of their own
                self.waiting["stats"].append(self.late.popleft()[1:])
            for op, batch in self.waiting.items():
                if batch and now >= self.next_stop[op]:
                    self._serve_batch(op)
            if now >= next_scan:
                next_scan = now + LIVENESS_S
                self._tick("reclaim dead Ps", self.reclaim_dead)
            if now >= next_empty:
                # Spans a snapshot's flush emptied wait on their partial lists (to keep the
                # pause short, and because the Ps usually take them again at once); those
                # still empty go back to the heap here, outside any pause.
                next_empty = now + EMPTY_SPANS_S
                self._tick("free empty spans", self.arena.free_empty_spans, self.arena.daemon_actor)
            if self.metrics and now >= next_metrics:
                next_metrics = now + self.metrics_interval
                self._tick("metrics snapshot", self.snapshot, self.park_deadline_ms, False, "metrics")
            # One bounded step at most per turn of the loop (service/scavenger.py): a request
            # waits for at most one step.
            self._tick("scavenge", self.scavenger.tick, now)
        # Every request gets its one reply: the refusals still held go now, and the socket is
        # given a second to send them before it closes.
        held = self.intake.flush()
        for env, reply in held:
            self._reply(env, reply)
        if held:
            self.sock.setsockopt(zmq.LINGER, 1000)
        if self.intake.refused:
            event(logging.INFO, "refusals", **self.intake.counts())

    def _tick(self, what, fn, *args):
        """A periodic task: its failure is logged, never fatal (the operation was rolled back)."""
        try:
            fn(*args)
        except LockUnavailable as e:  # tried again at the next tick
            self._lock_unavailable(e, task=what)
        except ShmallocError as e:
            event(logging.ERROR, f"{what} failed", error=f"{type(e).__name__}: {e}")

    def _lock_unavailable(self, e, **fields):
        """Log a lock the daemon could not take in time, once per lock and holder: a stranded
        one at ERROR (it stays until the process keeping it exits), a busy one at WARNING."""
        key = (e.lock, e.holder_pid, e.stranded)
        if key in self.stuck_seen:
            return
        self.stuck_seen.add(key)
        event(
            logging.ERROR if e.stranded else logging.WARNING,
            "lock stranded" if e.stranded else "lock busy, retried later",
            lock=e.lock,
            holder_pid=e.holder_pid,
            error=str(e),
            **fields,
        )

    # Ops that never touch the heap's structures, served even while the world is stopped: a
    # worker registering or re-binding its socket mid-pause must hear the STOP (and a new
    # worker must not wait a whole deadline for its registration).  Others wait for the resume.
    LIGHT_OPS = frozenset({"register", "unregister", "heartbeat", "ping"})

    def handle_one(self):
        """Serve one request (or queue a heavy one for its batch); False when none was waiting."""
        if self.deferred:
            env, frame, req = self.deferred.popleft()
        else:
            try:
                parts = self.sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return False
            taken = self._intake(parts)
            if taken is None:
                return True
            env, frame, req = taken
        if req["op"] in self.waiting and (req["op"] != "check" or self.admin_ok(req["token"])):
            if req["op"] == "stats" and len(self.late) < MAX_LATE and not self.snapshot_budget.admit(env[0]):
                self.late.append((time.monotonic() + self.intake.delay, env, frame, req))
            else:
                self.waiting[req["op"]].append((env, frame, req))
            return True
        self._answer(env, frame, req)
        return True

    def _intake(self, parts):
        """The first look at a message: (envelope, frame, decoded request) of a request its op's
        handler may serve, or None when it was refused here: a message of the wrong shape
        (dropped), or a frame that is no valid request (the refusal of the same bytes seen
        before is taken from a table, without unpacking them), answered as _refusal says."""
        env, frame = self._envelope(parts)
        if env is None:
            return None
        reply = self.intake.early(frame)
        if reply is None:
            try:
                return env, frame, protocol.decode_request(frame)
            except ProtocolError as exc:
                reply = protocol.encode_error(exc.req_id, exc)
                self.intake.remember(frame, reply)
        self._refusal(env, reply)
        return None

    def _envelope(self, parts):
        """ROUTER: [identity, frame] from a DEALER, [identity, b"", frame] from a REQ; the reply
        goes back in the same shape.  (None, None) for anything else, which is dropped."""
        if len(parts) == 2:
            return parts[:1], parts[1]
        if len(parts) == 3 and not parts[1]:
            return parts[:2], parts[2]
        self.intake.malformed()
        self.refusals.event(logging.WARNING, "dropped malformed message", frames=len(parts))
        return None, None

    def _answer(self, env, frame, req, memo=None):
        """Run the request's handler; its reply goes out now, or, a refusal, as _refusal says."""
        reply, code = answer(self, frame, env[0], req, memo)
        if code in REFUSALS:
            self._refusal(env, reply)
        else:
            self._reply(env, reply)

    def _refusal(self, env, reply):
        """A refusal the client earned: sent now within its budget and everyone's, else held in
        the tarpit and sent later by the serve loop, else (too many held) not sent at all --
        service/intake.py."""
        ident = env[0]
        if self.intake.admit(ident):
            self._reply(env, reply)
        elif self.intake.hold(ident, env, reply):
            self.refusals.event(
                logging.WARNING,
                "refusals held",
                client=ident.hex(),
                delay_ms=round(self.intake.delay * 1000),
                waiting=len(self.intake.held),
            )
        else:
            self.refusals.event(
                logging.WARNING,
                "refusal not answered",
                client=ident.hex(),
                reason="too many refusals held",
                dropped=self.intake.dropped,
            )

    def _serve_batch(self, op):
        """One pause (or one check) for every request of `op` waiting now, those already on the
        socket included; each gets its own reply of the shared result."""
        for _ in range(1000):
            if not self.handle_one():
                break
        batch, self.waiting[op] = self.waiting[op], []
        if op == "stats":  # the requests over their client's budget ride along
            batch += [x[1:] for x in self.late]
            self.late.clear()
        t = time.monotonic()
        try:
            if op == "stats":
                deadline = max(r["deadline_ms"] for _, _, r in batch)
                self.shared[op] = self.snapshot(deadline, any(r["slow"] for _, _, r in batch))
            else:
                self.shared[op] = self.check(batch[0][2]["token"])
        except Exception as e:  # every requester gets the error reply answer() makes of it
            self.shared[op] = e
        end = time.monotonic()
        gap = self.min_stop_interval if op == "stats" else max(self.min_stop_interval, end - t)
        self.next_stop[op] = end + gap
        try:
            memo = {}  # the shared result, checked and packed once for every reply
            for env, frame, req in batch:
                self._answer(env, frame, req, memo)
        finally:
            self.shared.pop(op, None)

    def _reply(self, env, reply):
        if reply is not None:
            sock = self.sock
            try:
                for part in env:  # send_multipart's work, without its flag arithmetic
                    sock.send(part, _SNDMORE)
                sock.send(reply, _NOBLOCK)
            except zmq.ZMQError as e:
                self.refusals.event(logging.WARNING, "reply not sent", error=str(e))

    def serve_light(self):
        """While the world is stopped: answer the light ops now, keep the others for after.
        Returns the slots whose socket was (re)bound, so that they can be sent the STOP."""
        bound = []
        while True:
            try:
                parts = self.sock.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return bound
            taken = self._intake(parts)
            if taken is None:
                continue
            env, frame, req = taken
            if req["op"] not in self.LIGHT_OPS:
                self.deferred.append(taken)
                continue
            self._answer(env, frame, req)
            bound += [k for k, i in self.routes.items() if i == env[0]]

    # --- who may do what (docs/ARCHITECTURE.md) ---------------------------------------
    @property
    def trusted_transport(self):
        """Every peer of the socket is trusted for administrative ops: the socket file's mode
        (ipc://) or a CURVE key (tcp://) let it in."""
        return ipc_path(self.endpoint) is not None or self.curve is not None

    def _token_of(self, k, token):
        reg = self.arena.registry
        return token != 0 and reg.state(k) == L.SLOT_ACTIVE and reg.token(k) == token

    def _refuse(self, op, why, **fields):
        """A Forbidden for the caller, and a log line (rate-limited: a flood writes a few)."""
        self.refusals.event(logging.WARNING, "request refused", op=op, reason=why, **fields)
        return Forbidden(f"{op}: {why}")

    def admin_ok(self, token=0):
        if self.trusted_transport:
            return True
        reg = self.arena.registry
        return bool(token) and any(self._token_of(k, token) and reg.alive(k) for k in reg.active_slots())

    def authorize_admin(self, op, token=0):
        if self.admin_ok(token):
            return
        raise self._refuse(
            op,
            "administrative ops are served over ipc:// or CURVE-authenticated tcp://, or with the "
            "token of a live P slot",
        )

    def request_shutdown(self, token=0, force=False):
        self.authorize_admin("shutdown", token)
        self.stopping = True
        self.force = self.force or force
        return {}

    def reclaim_dead(self):
        """Reclaim every dead P.  One whose locks are not free within LOCK_WAIT_S (held by a live
        process repairing it, or stranded) is left as it is and tried again RECLAIM_RETRY_S later."""
        arena = self.arena
        now = time.monotonic()
        for k in arena.registry.active_slots():
            if self.reclaim_at.get(k, 0) > now or arena.registry.alive(k):
                continue
            pid = arena.registry.pid(k)
            try:
                arena.reclaim(k, arena.daemon_actor)
            except LockUnavailable as e:
                self.reclaim_at[k] = now + RECLAIM_RETRY_S
                self._lock_unavailable(e, slot=k, pid=pid)
                continue
            except ShmallocError as e:
                event(logging.ERROR, "reclaim failed", slot=k, pid=pid, error=str(e))
                continue
            self.reclaim_at.pop(k, None)
            self.routes.pop(k, None)
            event(logging.INFO, "P reclaimed", slot=k, pid=pid)

    # --- ops (service/handlers.py) -----------------------------------------------------
    def register(self, pid, identity, slot=None, token=0):
        reg = self.arena.registry
        if slot is not None:  # one slot to look at, not every slot (a flood of these is cheap)
            held = 0 <= slot < self.arena.lay.nslots and reg.state(slot) == L.SLOT_ACTIVE
            mine = [slot] if held and reg.pid(slot) == pid else []
        else:
            mine = [k for k in reg.active_slots() if reg.pid(k) == pid]
        if len(mine) != 1:
            raise NotRegistered(
                f"pid {pid} holds no P slot (or several; name it): claim one in the arena first"
            )
        k = mine[0]
        if not self._token_of(k, token):
            raise self._refuse("register", f"the token does not match P slot {k}'s", slot=k)
        self.routes[k] = identity
        event(logging.INFO, "P joined", slot=k, pid=pid)
        return {"slot": k, "arena": self.name, "layout_version": L.VERSION, "heartbeat_ms": HEARTBEAT_MS}

    def unregister(self, slot, identity, token=0):
        # A slot already given back has nothing left to take (the worker's unregister often
        # arrives after its close freed the slot); a held one is left only with its token.
        held = 0 <= slot < self.arena.lay.nslots and self.arena.registry.state(slot) == L.SLOT_ACTIVE
        if held and not self._token_of(slot, token):
            raise self._refuse("unregister", f"the token does not match P slot {slot}'s", slot=slot)
        if self.routes.get(slot) == identity:
            del self.routes[slot]
            event(logging.INFO, "P left", slot=slot)
        return {}

    def heartbeat(self, slot, identity, pid=0, token=0, arena_id=0):
        if arena_id and arena_id != self.arena.arena_id:
            raise ForeignReference(
                f"this daemon serves arena {self.arena.arena_id:#018x}, not {arena_id:#018x}: the "
                "daemon of that arena is gone and its arena with it"
            )
        if not (0 <= slot < self.arena.lay.nslots and self.arena.registry.state(slot) == L.SLOT_ACTIVE):
            raise NotRegistered(f"P slot {slot} is not held by any worker")
        if pid and self.arena.registry.pid(slot) != pid:
            raise NotRegistered(f"P slot {slot} is held by pid {self.arena.registry.pid(slot)}, not {pid}")
        if not self._token_of(slot, token):
            raise self._refuse("heartbeat", f"the token does not match P slot {slot}'s", slot=slot)
        if self.routes.get(slot) != identity:
            self.routes[slot] = identity  # a worker that outlived a previous daemon
            event(logging.INFO, "P re-registered", slot=slot, pid=self.arena.registry.pid(slot))
        self.arena.q[self.arena.lay.slot_word(slot) + L.SLOT["heartbeat_ns"]] = time.time_ns()
        return {"epoch": self.arena.q[L.HDR["epoch"]]}

    def ping(self):
        from . import __version__

        return {
            "pid": os.getpid() if self.trusted_transport else 0,  # pids only to trusted peers
            "uptime_s": time.monotonic() - self.started,
            "epoch": self.arena.q[L.HDR["epoch"]],
            "num_p": len(self.arena.registry.active_slots()),
            "arena": self.name,
            "version": __version__,
        }

    def release(self, token=0):
        self.authorize_admin("release", token)
        # Free spans belong to no P: the heap lock is all it takes, the world runs on.
        n = self.arena.scavenge(self.arena.daemon_actor)
        event(logging.INFO, "released idle pages", bytes=n)
        return {"released_bytes": n}

    def check(self, token=0):
        self.authorize_admin("check", token)
        shared = self.shared.get("check")
        if shared is not None:  # answering a batch: the walk was made once for all
            if isinstance(shared, Exception):
                raise shared
            return shared
        with self.stopped_world(self.park_deadline_ms) as world:
            snap = self._figures(world, slow=False)
            problems = [f"{why}: arena not checked" for why in not_quiet(world)]
            if not problems:
                try:
                    self.arena.free_empty_spans(self.arena.daemon_actor)
                    problems = self.arena.check_all()
                except LockUnavailable as e:
                    problems = [f"{e}: arena not checked"]
        snap.update(world["meta"])
        if problems:
            event(logging.ERROR, "check found problems", count=len(problems), first=problems[0])
        return {"problems": problems, "snapshot": snap}

    def snapshot(self, deadline_ms, slow, source="request"):
        shared = self.shared.get("stats")
        if shared is not None and source == "request":  # answering a batch: one pause for all
            if isinstance(shared, Exception):
                raise shared
            return shared
        deadline_ms = min(deadline_ms, self.park_deadline_ms)
        with self.stopped_world(deadline_ms) as world:
            snap = self._figures(world, slow)
        snap.update(world["meta"])
        if self.prev_counters and snap["consistent"]:
            back = stats.monotonic(self.prev_counters, snap)
            if back:
                event(logging.ERROR, "counters went backwards", problems=back)
        if snap["consistent"]:
            self.prev_counters = snap
            self.last_snapshot = snap
        level = (
            logging.WARNING
            if snap["pause_ns"] > self.slow_snapshot_ms * 1_000_000 or not snap["consistent"]
            else logging.DEBUG
        )
        event(
            level,
            "snapshot",
            epoch=snap["epoch"],
            pause_ms=round(snap["pause_ns"] / 1e6, 3),
            num_p=snap["num_p"],
            consistent=snap["consistent"],
            unflushed=snap["unflushed"],
            source=source,
        )
        if not self.trusted_transport:  # pids only to trusted peers
            snap = dict(snap, per_p=[dict(p, pid=0) for p in snap["per_p"]])
        return {"snapshot": snap}

    # --- stop the world ---------------------------------------------------------------
    def stopped_world(self, deadline_ms):
        return StoppedWorld(self, deadline_ms)

    def _figures(self, world, slow):
        """Every parked P's cache was flushed as it parked (StoppedWorld), every dead one
        reclaimed: only now read -- the seed's order."""
        self.scavenger.publish()  # the retained target as of now (a share of heap_sys follows it)
        if not slow:
            return stats.read_stats(self.arena)
        if not_quiet(world):
            snap, d = stats.read_stats(self.arena), ["not compared: " + "; ".join(not_quiet(world))]
        else:
            snap, d = stats.read_compared(self.arena)  # no worker claims a slot in between
        snap["slow_equal"] = not d
        snap["slow_diff"] = d
        return snap

    # --- stop --------------------------------------------------------------------------
    def shutdown(self):
        """Park and flush one last time (and, forced, close the arena for good in one more
        pause), then remove the socket file, and the segment unless live workers keep it."""
        if self.arena is not None and not self.arena.closed:
            try:
                snap = self.snapshot(self.park_deadline_ms, False, source="shutdown")["snapshot"]
                event(
                    logging.INFO,
                    "final snapshot",
                    epoch=snap["epoch"],
                    heap_alloc=snap["heap_alloc"],
                    heap_objects=snap["heap_objects"],
                    num_p=snap["num_p"],
                    consistent=snap["consistent"],
                )
            except Exception as e:  # the stop goes on either way
                event(logging.ERROR, "final snapshot failed", error=str(e))
            if self.force:
                self._close_for_good()
        if self.metrics:
            self.metrics.stop()
        self._close_socket()  # no new worker learns the arena's name from here on
        self._stop_arena()
        event(logging.INFO, "stopped", arena=self.name)

    def _close_for_good(self):
        """A forced stop: while the world is stopped (no P is then between reading a RESYNC and
        writing RUN over it), mark the arena closed and set every live P's stop byte to
        STOP_CLOSED; the resume leaves them so.  Each P's next call raises ArenaClosed."""
        try:
            with self.stopped_world(self.park_deadline_ms) as world:
                told = close_for_good(self.arena, L.CLOSED_FORCED)
        except Exception as e:  # closed all the same below, outside a pause
            event(logging.ERROR, "closing pause failed", error=str(e))
            return
        event(
            logging.WARNING,
            f"closed the arena for good: {len(told)} workers told",
            arena=self.name,
            slots=told,
            late=world["late"],
        )

    def _stop_arena(self):
        """Unlink the segment, unless live workers hold Ps and the stop was not forced: then it
        is kept for them -- their blocks and handles stay valid, and a daemon restarted on the
        endpoint adopts it.  Unlinking it under them would split the world: they would go on in
        a segment nobody can reach, and their handles would name other memory in the next
        daemon's arena.  Decided under the registry lock: a P claimed after it is refused."""
        arena = self.arena
        live = []
        if arena is not None and not arena.closed:
            if self.force:
                close_for_good(arena, L.CLOSED_FORCED)  # idempotent: the mark is written once
            else:
                live = close_for_good(arena, L.CLOSED_STOPPED, unless_live=True)
            if live:
                arena.q[L.HDR["kept_by"]] = os.getpid()
                event(
                    logging.WARNING,
                    f"kept the arena for {len(live)} live workers",
                    arena=self.name,
                    slots=live,
                    pids=[arena.registry.pid(k) for k in live],
                    why=f"unlinking it would strand them in a segment no daemon serves; a daemon "
                    f"restarted on {self.endpoint} adopts it (`shmalloc shutdown --force` closes it "
                    "for good)",
                )
        self._release_arena(unlink=not live)

    def _close_socket(self):
        if self.sock is not None:
            self.sock.close()  # LINGER as set: 0, or the second serve() gave held refusals to leave
            self.sock = None
        if self.curve is not None:
            self.curve.stop()  # its ZAP socket is on self.ctx: closed before the term below
            self.curve = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
            path = ipc_path(self.endpoint)
            if path:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _release_arena(self, unlink):
        if self.arena is None:
            return
        try:
            ofd_unlock(self.arena.fd, DAEMON_LOCK_BYTE)
        except OSError:
            pass
        self.arena.q[L.HDR["daemon_pid"]] = 0
        self.arena.close()
        if unlink:
            unlink_segment(self.name)


# --- entry point -------------------------------------------------------------------------
def run(args):
    """`shmalloc daemon`: foreground until SIGTERM / SIGINT / a shutdown request."""
    setup_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO)
    try:
        d = Daemon(
            endpoint=args.endpoint,
            max_heap=parse_size(args.max_heap) if args.max_heap else None,
            name=args.name,
            nslots=args.slots,
            socket_mode=int(args.socket_mode, 8),
            park_deadline_ms=args.park_deadline_ms,
            metrics_addr=args.metrics_addr,
            metrics_interval=args.metrics_interval,
            slow_snapshot_ms=args.slow_snapshot_ms,
            realtime_pause=not args.no_realtime_pause,
            ragged_flush=not args.no_ragged_flush,
            min_stop_interval_ms=args.min_stop_interval_ms,
            insecure=args.insecure,
            curve_server_key=args.curve_server_key,
            curve_clients=args.curve_clients,
            retain=args.retain,
            refusal_budget=tuple(args.refusal_budget),
            global_refusal_budget=tuple(args.global_refusal_budget),
            tarpit_ms=args.tarpit_ms,
            snapshot_budget=tuple(args.snapshot_budget),
        )
    except (StartupError, ValueError) as e:
        event(logging.ERROR, "cannot start", error=str(e))
        return 2

    def on_signal(signum, frame):
        d.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        d.start()
    except (StartupError, OSError, ValueError) as e:
        event(logging.ERROR, "cannot start", error=str(e))
        return 2
    try:
        d.serve()
    finally:
        d.shutdown()
    return 0
