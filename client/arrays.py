"""numpy arrays in the heap (the optional `numpy` extra; imported by Heap.ndarray or by
unpickling an array, never by `import client`).

    a = heap.ndarray((1000, 1000), dtype="float32")   # a HeapArray backed by a new block
    pickle.dumps(a)       # a reference (arena id, handle, offset, shape, strides, dtype): < 200 B
    pickle.loads(data)    # in any process reaching the same daemon: a HeapArray viewing the same
                          # memory (a write on one side is seen on the other)
    a[::2, 10:]           # slices and views know the block too, and pickle as references
    heap.free(a)          # frees a's block; every view of it is dangling after that

An array derived from a heap array that does not lie in its block (the result of `a + 1`, a
copy) is an ordinary array: it pickles by value and heap.free() refuses it.  Who frees: as for a
Block, whoever is done with the array last, once, from any process.
"""

from typing import Any

import numpy as np

from shm import Block

from .pool import heap_for

__all__ = ["HeapArray", "new_array"]


class HeapArray(np.ndarray):
    """A numpy array that views a block of the heap and knows it (`.block`)."""

    _shm_block: Block | None = None
    _shm_addr = 0  # where the block starts in this process's mapping

    def __array_finalize__(self, obj: Any) -> None:
        if obj is not None:
            self._shm_block = getattr(obj, "_shm_block", None)
            self._shm_addr = getattr(obj, "_shm_addr", 0)

    @property
    def block(self) -> Block | None:
        """The block this array views, or None if it does not lie in one."""
        ref = self._shm_ref()
        return ref[0] if ref else None

    def _shm_ref(self) -> tuple[Block, int] | None:
        """(block, offset of the first element in it), when the array's bytes lie in the block."""
        blk = self._shm_block
        if blk is None:
            return None
        ptr = self.__array_interface__["data"][0]
        lo = hi = ptr - self._shm_addr
        if self.size:
            for n, s in zip(self.shape, self.strides):
                if s < 0:
                    lo += (n - 1) * s
                else:
                    hi += (n - 1) * s
            hi += self.itemsize
        if lo < 0 or hi > blk[2]:
            return None
        return blk, ptr - self._shm_addr

    def __reduce_ex__(self, protocol: Any) -> Any:
        ref = self._shm_ref()
        if ref is None:
            return self.view(np.ndarray).__reduce_ex__(protocol)
        blk, off = ref
        dt = self.dtype
        dtype: Any = dt.str if np.dtype(dt.str) == dt and not dt.names else dt
        return _load_array, (
            blk[3].arena.arena_id,
            blk[0],
            blk[1],
            off,
            self.shape,
            self.strides,
            dtype,
            bool(self.flags.writeable),
        )

    def __reduce__(self) -> Any:
        return self.__reduce_ex__(2)

    def __index__(self) -> int:
        """The block's handle, so that heap.free(a) and heap.view(a) take the array."""
        ref = self._shm_ref()
        if ref is None:
            return super().__index__()
        return ref[0][0]


def _wrap(blk: Block, shape: Any, dtype: Any, offset: int, strides: Any, order: Any = "C") -> HeapArray:
    mv = blk[3].view(blk[0])  # the block's whole capacity
    a = np.ndarray.__new__(HeapArray, shape, dtype, buffer=mv, offset=offset, strides=strides, order=order)
    a._shm_block = blk
    a._shm_addr = a.__array_interface__["data"][0] - offset
    return a


def new_array(h: Any, shape: Any, dtype: Any = "float64", order: Any = "C") -> HeapArray:
    """A HeapArray of `shape` and `dtype` backed by a new block of `h` (contents undefined)."""
    dt = np.dtype(dtype)
    if dt.hasobject:
        raise TypeError(f"a heap array cannot hold Python objects (dtype {dt})")
    shape = (shape,) if isinstance(shape, int | np.integer) else tuple(int(n) for n in shape)
    n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    blk = h.alloc(n)
    try:
        return _wrap(blk, shape, dt, 0, None, order)
    except BaseException:
        h.free(blk)
        raise


def _load_array(
    arena_id: int,
    handle: int,
    size: int,
    offset: int,
    shape: tuple[int, ...],
    strides: tuple[int, ...],
    dtype: Any,
    writeable: bool = True,
) -> HeapArray:
    h = heap_for(arena_id)
    blk = Block((handle, size, len(h.view(handle)), h))
    a = _wrap(blk, shape, dtype, offset, strides)
    if not writeable:
        a.flags.writeable = False
    return a
