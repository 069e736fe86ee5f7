"""shmalloc's daemon side: the daemon (daemon.py), the daemon's half of the control protocol
(handlers.py: one handler per op, and dispatch; the wire format is client/protocol.py), what
a flood of refused requests may cost it (intake.py: refusal budgets and a tarpit), the command
line (cli.py), rendering (render.py) and metrics (metrics.py).
See shm/__init__.py for the allocator's overview."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shmalloc")  # the one source: pyproject.toml's [project] version
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
