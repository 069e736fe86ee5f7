"""The daemon's log: one line per lifecycle event, text for people or JSON for a pipeline.
See shm/__init__.py for the allocator's overview.

    event(level, what, **fields)      the one call that logs: a message and its fields
    setup_logging(fmt, level, stream) text (default) or json, on stderr
"""

import json
import logging
import sys
import time

log = logging.getLogger("shmalloc.daemon")


class JsonFormatter(logging.Formatter):
    def format(self, record):
        d = {"ts": round(record.created, 6), "level": record.levelname.lower(), "event": record.getMessage()}
        d.update(getattr(record, "fields", {}))
        return json.dumps(d, sort_keys=True, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record):
        ts = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return f"{ts} {record.levelname.lower():7s} {record.getMessage()}" + (f"  {fields}" if fields else "")


def setup_logging(fmt="text", level=logging.INFO, stream=None):
    h = logging.StreamHandler(stream or sys.stderr)
    h.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    log.handlers[:] = [h]
    log.setLevel(level)
    log.propagate = False


def event(level, what, **fields):
    log.log(level, what, extra={"fields": fields})
