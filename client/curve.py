"""ZeroMQ CURVE for tcp:// control endpoints: the keys a client proves itself with.  See
docs/ARCHITECTURE.md ("Who may do what") and README's Deploy section.

    curve_keys(endpoint, curve)   the (server public, client public, client secret) keys to use
    dealer(ctx, endpoint, curve)  a DEALER socket connected to `endpoint`, with CURVE when keyed

`curve` is a pair of file paths, (client secret certificate, server public certificate), as
`shmalloc keys` writes them (zmq.auth.create_certificates); None takes them from
$SHMALLOC_CURVE_CLIENT_KEY and $SHMALLOC_CURVE_SERVER_KEY when both are set; False means none.
Keys apply to tcp:// endpoints only: an ipc:// socket is guarded by its file's mode.
"""

import os
from typing import Any, Literal

import zmq

from shm.errors import ShmallocError

__all__ = ["Curve", "CurveKeyError", "ENV_CLIENT_KEY", "ENV_SERVER_KEY", "curve_keys", "dealer"]

ENV_CLIENT_KEY = "SHMALLOC_CURVE_CLIENT_KEY"
ENV_SERVER_KEY = "SHMALLOC_CURVE_SERVER_KEY"

Curve = tuple[str, str] | Literal[False] | None


class CurveKeyError(ShmallocError, ValueError):
    """A CURVE certificate file is missing, unreadable, or lacks the key it must hold."""

    code = "CURVE_KEY"


def _load(path: str, what: str, secret: bool) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        public, secret_key = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as e:
        raise CurveKeyError(f"cannot read the {what} {path}: {e}") from None
    if secret and not secret_key:
        raise CurveKeyError(
            f"{path} holds no secret key: give the {what} (the NAME.key_secret file `shmalloc keys` wrote)"
        )
    return public, secret_key


def curve_keys(endpoint: str, curve: Curve = None) -> tuple[bytes, bytes, bytes] | None:
    """(server public key, client public key, client secret key) for `endpoint`, or None when
    the connection is to go without CURVE (not tcp://, curve=False, or no keys given)."""
    if not endpoint.startswith("tcp://") or curve is False:
        return None
    if curve is None:
        client_file, server_file = os.environ.get(ENV_CLIENT_KEY), os.environ.get(ENV_SERVER_KEY)
        if not client_file and not server_file:
            return None
        if not (client_file and server_file):
            raise CurveKeyError(f"set both {ENV_CLIENT_KEY} and {ENV_SERVER_KEY}, or neither")
    else:
        client_file, server_file = curve
    if not zmq.has("curve"):
        raise CurveKeyError("this libzmq was built without CURVE support")
    client_public, client_secret = _load(client_file, "client's secret certificate", secret=True)
    server_public, _ = _load(server_file, "server's public certificate", secret=False)
    assert client_secret is not None
    return server_public, client_public, client_secret


def dealer(context: Any, endpoint: str, curve: Curve = None) -> tuple[Any, bool]:
    """A DEALER socket (LINGER 0) connected to `endpoint`, a CURVE client of the daemon's key
    when `curve_keys` finds keys; and whether it did."""
    keys = curve_keys(endpoint, curve)
    sock = context.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = keys
        sock.connect(endpoint)
    except BaseException:
        sock.close(0)
        raise
    return sock, keys is not None
