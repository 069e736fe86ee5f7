"""The two declarations every op module makes: request fields and reply fields.
See shm/__init__.py for an overview and client/protocol.py for the envelope.

This module imports nothing from client/, so that an op module can be imported first, alone,
without a circular import through client.protocol.
"""

from typing import Any, NamedTuple

# Python type -> the name the docs and error messages use for it.
TYPE_NAMES = {
    int: "int",
    bool: "bool",
    float: "float",
    str: "str",
    bytes: "bin",
    dict: "map",
    list: "list",
    type(None): "nil",
}

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1


class Field(NamedTuple):
    """One request field.

    type      int, bool, float or str -- matched exactly: a bool is not an int, an int is not
              a float.
    required  True: the request must carry it.  False: `default` is filled in when absent.
    bounds    (lo, hi) inclusive: the value for int and float, the length for str; None: no bound.
    doc       one line for docs/PROTOCOL.md.
    default   the value an absent optional field takes (must itself be valid).
    """

    type: type
    required: bool
    bounds: Any
    doc: str
    default: Any = None


class Reply(NamedTuple):
    """One reply field.  type: int, float (an int is accepted and sent as a float), bool, str,
    dict (a msgpack map) or list."""

    type: type
    doc: str
