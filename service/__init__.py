"""shmalloc's daemon side: the daemon (daemon.py), its control protocol (protocol.py, one module
per op in ops/), the command line (cli.py), rendering (render.py) and metrics (metrics.py).
See shm/__init__.py for the allocator's overview."""

__version__ = "0.1.0"
