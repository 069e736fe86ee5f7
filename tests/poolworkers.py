"""Task functions for the pool tests (test_pool.py, test_arrays.py): module-level, so that
`spawn` workers import them by name (tests/ is on sys.path through pyproject)."""

import pickle

import client


def block_task(blk):
    """A Block from the parent: check its bytes, write a marker the parent must see, and return
    a new Block of this worker's (the parent frees it) with what was read."""
    got = bytes(blk.buf)
    ok = got == bytes([blk.handle % 251]) * blk.size
    blk.buf[0] = 0xAB
    out = client.heap().put(b"ok" if ok else b"bad")
    return out, len(pickle.dumps(blk))


def array_task(a):
    """A heap array from the parent: double it in place (the parent sees it), and return a new
    heap array (the parent frees it)."""
    a *= 2
    out = client.heap().ndarray(a.shape, a.dtype)
    out[...] = a + 1
    return out


def oob_task(payload):
    """An oob payload: load it (zero copy), write into its large array, return a sum."""
    obj = client.oob_loads(payload)
    obj["big"][0] = 42.0
    return float(obj["big"].sum()), obj["small"], type(obj["big"]).__name__
