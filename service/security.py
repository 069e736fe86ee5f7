"""Who may do what: the daemon's checks of the files it adopts, and of the requests it serves.
See docs/ARCHITECTURE.md ("Who may do what").

    endpoint_id(endpoint)                  the arena header's `endpoint_id` word for this endpoint
    check_segment(st, path, allowed_mode) refuse a segment not owned by us, or too open
    prepare_dir(path, socket_mode)        create the socket's directory, or check the one there
    LogLimiter                            at most a few log lines per kind per interval

Nothing here trusts a name: a segment or directory is judged by its owner and mode (fstat of
the open file, lstat of a directory -- a symlink is refused), as ssh-agent and tmux judge theirs.
"""

import hashlib
import os
import pwd
import stat
import time

from shm.errors import StartupError

from .logs import event


def endpoint_id(endpoint):
    """64 bits that say "made by a shmalloc daemon for `endpoint`" (the header's `owner`)."""
    return int.from_bytes(hashlib.sha256(b"shmalloc daemon " + endpoint.encode()).digest()[:8], "little") or 1


def _user(uid):
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def check_segment(st, path, allowed_mode):
    """The segment `path` (its os.stat result `st`) may be adopted: a regular file owned by our
    effective uid, whose mode gives nothing beyond `allowed_mode`.  StartupError otherwise."""
    me = os.geteuid()
    if not stat.S_ISREG(st.st_mode):
        raise StartupError(f"{path} is not a regular file: not adopted")
    if st.st_uid != me:
        raise StartupError(
            f"{path} is owned by {_user(st.st_uid)}, not by this daemon's user {_user(me)}: "
            "not adopted (someone else made it; remove it, or pass another --name)"
        )
    extra = stat.S_IMODE(st.st_mode) & ~allowed_mode
    if extra:
        raise StartupError(
            f"{path} (owner {_user(st.st_uid)}) has mode {stat.S_IMODE(st.st_mode):04o}, more open than "
            f"{allowed_mode:04o}: not adopted (remove it with `shmalloc cleanup`, or pass another --name)"
        )


def prepare_dir(path, socket_mode):
    """The directory of the ipc socket: made 0700 (0710 when --socket-mode lets the group in,
    so that the group may connect), or, when it exists, checked: a directory (not a symlink)
    owned by us, not writable by others, nor by the group unless --socket-mode gives the group
    write access.  StartupError naming it and its owner otherwise."""
    group = socket_mode & 0o070
    try:
        os.mkdir(path, 0o700 | (0o010 if group else 0))
        os.chmod(path, 0o700 | (0o010 if group else 0))  # the umask may have taken bits
        return
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        return prepare_dir(path, socket_mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"socket directory {path} is not a directory (a symlink?): refused")
    if st.st_uid != os.geteuid():
        raise StartupError(
            f"socket directory {path} is owned by {_user(st.st_uid)}, not by this daemon's user "
            f"{_user(os.geteuid())}: refused (whoever owns it can replace the socket); remove it "
            "or pass another --endpoint"
        )
    mode = stat.S_IMODE(st.st_mode)
    bad = 0o002 | (0 if socket_mode & 0o020 else 0o020)
    if mode & bad:
        raise StartupError(
            f"socket directory {path} (owner {_user(st.st_uid)}) has mode {mode:04o}: writable by "
            f"{'others' if mode & 0o002 else 'its group'}, who could replace the socket; refused "
            f"(chmod go-w {path})"
        )


class LogLimiter:
    """At most `burst` log lines per kind every `interval` seconds; the next line after a quiet
    spell says how many were suppressed.  A client that floods refusals cannot flood the log."""

    def __init__(self, burst=5, interval=10.0):
        self.burst, self.interval = burst, interval
        self.kinds = {}  # kind -> [window start, lines in window, suppressed]

    def event(self, level, kind, **fields):
        now = time.monotonic()
        w = self.kinds.get(kind)
        if w is None or now - w[0] >= self.interval:
            suppressed = w[2] if w else 0
            w = self.kinds[kind] = [now, 0, 0]
            if suppressed:
                fields["suppressed"] = suppressed
        if w[1] >= self.burst:
            w[2] += 1
            return False
        w[1] += 1
        event(level, kind, **fields)
        return True


__all__ = ["endpoint_id", "check_segment", "prepare_dir", "LogLimiter"]
