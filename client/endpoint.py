"""Where the daemon listens and what its arena is called: the rules every side shares.
See shm/__init__.py for the allocator's overview.

    runtime_dir()              $XDG_RUNTIME_DIR/shmalloc, else /tmp/shmalloc-$UID
    default_endpoint()         $SHMALLOC_ENDPOINT, else ipc://<runtime_dir>/control.sock
    ipc_path(endpoint)         the socket file of an ipc:// endpoint; None for any other
    arena_name_for(endpoint)   the arena's /dev/shm name, derived from the endpoint
"""

import hashlib
import os

__all__ = ["runtime_dir", "default_endpoint", "ipc_path", "arena_name_for"]


def runtime_dir() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return os.path.join(base, "shmalloc")
    return f"/tmp/shmalloc-{os.getuid()}"


def default_endpoint() -> str:
    return os.environ.get("SHMALLOC_ENDPOINT") or f"ipc://{runtime_dir()}/control.sock"


def ipc_path(endpoint: str) -> str | None:
    return endpoint[len("ipc://") :] if endpoint.startswith("ipc://") else None


def arena_name_for(endpoint: str) -> str:
    """The arena's /dev/shm name, derived from the endpoint so that a restarted daemon (and
    `shmalloc cleanup`) find the segment a killed one left."""
    h = hashlib.sha1(endpoint.encode()).hexdigest()[:10]
    return f"shmalloc-{os.getuid()}-{h}"
