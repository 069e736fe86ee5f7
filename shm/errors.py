"""The one error tree of shmalloc.  See shm/__init__.py for an overview.

    ShmallocError                  base of everything this project raises on purpose
    ├── OutOfMemory                the heap (or /dev/shm) is full; nothing was changed
    ├── BadHandle                  a handle that is not a live object start; nothing was changed
    │   └── DoubleFree             the handle was an object, but it is already free
    ├── BadSize                    a negative allocation size (also a ValueError)
    ├── BadSizeType                an allocation size that is no int (also a TypeError)
    ├── LayoutMismatch             the segment is not an arena of this layout version
    ├── CorruptionError            an invariant is broken (names it); never raised for bad input
    ├── ArenaClosed                the heap was closed in this process, or its arena for good
    ├── ForkedHeap                 a Heap used in a child after fork(); connect() again there
    ├── NoFreeSlot                 every P slot is taken
    ├── LockUnavailable            a lock's holder died but its lock is still held (stranded), or
    │                              the daemon's bounded wait for a lock ran out; nothing was changed
    ├── ForeignReference           a pickled reference names another arena than the daemon's
    ├── StartupError               the daemon cannot start (endpoint taken, /dev/shm too small...)
    └── ProtocolError              control channel (service/, client/) errors; `code` is the wire code
        ├── DaemonUnavailable      no daemon answered at the endpoint before the deadline
        ├── NotRegistered          the message names a P slot no live worker holds
        ├── Forbidden              the caller did not prove what the op needs (a slot's token)
        └── RemoteError            the daemon answered {"ok": false}; `code` and message from the wire

Input errors (OutOfMemory, BadHandle, ...) leave the arena exactly as it was: every mutation made
under a cross-process lock is undo-logged and rolled back when the operation fails half way.
"""


class ShmallocError(Exception):
    """Base class of every error shmalloc raises on purpose."""

    code: str = "ERROR"  # the wire code (client/protocol.py) of this class


class OutOfMemory(ShmallocError, MemoryError):
    """The reserved heap, or the tmpfs behind /dev/shm, has no room left.  Recoverable."""

    code = "OUT_OF_MEMORY"


class BadHandle(ShmallocError, ValueError):
    """A handle that is not the start of a live object: out of range, not an object
    boundary, never allocated.  Nothing was changed."""

    code = "BAD_HANDLE"


class BadSize(ShmallocError, ValueError):
    """An allocation size that is negative.  Nothing was changed."""

    code = "BAD_SIZE"


class BadSizeType(ShmallocError, TypeError):
    """An allocation size that is not an int (nor has __index__).  Nothing was changed."""

    code = "BAD_SIZE_TYPE"


class DoubleFree(BadHandle):
    """The handle is an object start, but the object is already free."""

    code = "DOUBLE_FREE"


class LayoutMismatch(ShmallocError):
    """The segment's magic, layout version or size does not match this code."""

    code = "LAYOUT_MISMATCH"


class CorruptionError(ShmallocError):
    """An invariant of the arena is broken.  The message names it (Go: throw)."""

    code = "CORRUPTION"


class ArenaClosed(ShmallocError):
    """The Heap (or arena) was closed in this process, or its arena was closed for good: its
    daemon stopped with `force`, or `shmalloc cleanup --force` removed it.  The message says
    which; a closed-for-good arena's blocks are gone, and a new connect() gives a P of the
    daemon serving the endpoint now."""

    code = "CLOSED"


class ForkedHeap(ShmallocError):
    """A Heap inherited through fork() was used in the child.  The child must call
    client.connect() to get a P of its own; the parent's P stays the parent's."""

    code = "FORKED"


class NoFreeSlot(ShmallocError):
    code = "NO_FREE_SLOT"


class LockUnavailable(ShmallocError):
    """A cross-process lock could not be taken, and the operation was rolled back (nothing was
    changed).  `stranded`: the holder named in the lock's dirty word is dead, but a process that
    inherited its open file description without running Python's at-fork hooks (a fork made from
    C code) keeps the kernel lock; it is released, and the dead operation rolled back, when that
    process exits.  Otherwise a bounded wait (the daemon's) ran out.  `lock` names the lock,
    `holder_pid` the pid its dirty word names (0: none)."""

    code = "LOCK_UNAVAILABLE"

    def __init__(self, message: str, lock: str = "", holder_pid: int = 0, stranded: bool = False) -> None:
        super().__init__(message)
        self.lock = lock
        self.holder_pid = holder_pid
        self.stranded = stranded

    def describe(self) -> dict[str, object]:
        """The map a snapshot lists in `stuck_locks`."""
        return {"lock": self.lock, "holder_pid": self.holder_pid, "stranded": self.stranded}


class ForeignReference(ShmallocError, ValueError):
    """A pickled Block or array names an arena other than the one this process reaches: it was
    made under another daemon, or under one stopped since (its blocks are gone).  Load it in a
    process connected to the daemon that allocated it."""

    code = "FOREIGN_REFERENCE"


class ChannelClosed(ShmallocError, EOFError):
    """The other end of a channel (shm/channel.py) closed it or died, and nothing is left to
    receive; or this end is closed, or is not the end for the call.  Nothing was sent."""

    code = "CHANNEL_CLOSED"


class ChannelBusy(ShmallocError):
    """A channel's receiving end is open in another live process: one receiver at a time."""

    code = "CHANNEL_BUSY"


class ChannelUnsupported(ShmallocError):
    """Channels need x86-64's memory order (shm/channel.py); this machine is another."""

    code = "CHANNEL_UNSUPPORTED"


class StartupError(ShmallocError):
    """The daemon cannot start: the endpoint is served, the arena is held or of another
    version, /dev/shm is too small, an option is malformed.  Nothing was left behind."""

    code = "STARTUP"


class ProtocolError(ShmallocError):
    """A malformed or unanswerable control-channel message."""

    code = "BAD_REQUEST"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class DaemonUnavailable(ProtocolError):
    code = "UNAVAILABLE"


class NotRegistered(ProtocolError):
    """The message names a P slot that no live worker holds."""

    code = "NOT_REGISTERED"


class Forbidden(ProtocolError):
    """The request needs a proof the caller did not give: the token of its P slot (worker ops),
    or, over plain tcp://, the token of a live P slot (administrative ops)."""

    code = "FORBIDDEN"


class RemoteError(ProtocolError):
    """The daemon replied {"ok": false, "error": code, "message": ...}."""

    code = "REMOTE"
