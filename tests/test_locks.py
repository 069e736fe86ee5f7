"""Operations and their undo logs (shm/locks.py): a failed operation rolled back, and the largest
operations still fitting their bounded log."""

import pytest
from support import assert_healthy, metadata_bytes

from shm import BadHandle, ProcessCache


def test_undo_log_rolls_back_a_failed_operation(arena):
    """An exception half way through an operation leaves the arena as it was."""
    p = ProcessCache(arena)
    keep = [p.alloc(5000) for _ in range(3)]
    before = metadata_bytes(arena)

    def half(op):
        arena.large.alloc(op, 13, -1)  # a 100 000-byte object: 13 pages
        arena.heap.free_span  # noqa: B018 - reached: the allocation above is complete
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        arena.run(p.slot, half)
    assert metadata_bytes(arena) == before
    for b in keep:
        p.free(b)
    assert_healthy(arena, p)
    p.close()


@pytest.mark.slow
def test_huge_block_fits_the_undo_log(make_arena):
    """One operation's undo log is bounded (layout.LOG_BYTES): a block of most of the heap must
    still be allocated, found, freed and checked; so must 300 spans' worth of small objects."""
    arena = make_arena(heap_max=96 << 20)
    p = ProcessCache(arena)
    big = p.alloc(64 << 20)
    big.buf[-8:] = b"lastpage"
    with pytest.raises(BadHandle):
        p.free(big.handle + (32 << 20))  # an interior page of a large block
    small = [p.alloc(8) for _ in range(300 * 1024)]  # 300 spans of the 8-byte class
    for b in small:
        p.free(b)
    arena.flush_all(stopped=[p.slot], keep_empty=True)
    assert arena.free_empty_spans() == 1  # the one span still cached at the flush
    assert bytes(p.view(big.handle)[-8:]) == b"lastpage"
    p.free(big)
    snap = assert_healthy(arena, p)
    assert snap["heap_objects"] == 0
    p.close()
