"""Misuse at the edges: sizes that are no int or negative, a handle on an interior page of a
large block, scavenging any number of free spans.  Each error names the problem, is one of the
error tree, and changes nothing."""

import pytest
from support import assert_healthy, metadata_bytes

from shm import BadHandle, BadSize, BadSizeType, ProcessCache, ShmallocError


@pytest.mark.parametrize(
    "size,error,message",
    [
        (1.5, BadSizeType, "alloc size must be an int, got float 1.5"),
        ("x", BadSizeType, "alloc size must be an int, got str 'x'"),
        (None, BadSizeType, "alloc size must be an int, got NoneType None"),
        (40000.5, BadSizeType, "alloc size must be an int, got float 40000.5"),
        (-1, BadSize, "alloc size must be >= 0, got -1"),
    ],
)
def test_a_bad_size_raises_a_clear_error_of_the_tree_and_changes_nothing(arena, size, error, message):
    p = ProcessCache(arena)
    before = metadata_bytes(arena)
    with pytest.raises(error) as e:
        p.alloc(size)
    assert str(e.value) == message
    assert isinstance(e.value, ShmallocError)
    assert isinstance(e.value, TypeError if error is BadSizeType else ValueError)
    assert metadata_bytes(arena) == before
    p.close()


def test_a_handle_on_an_interior_page_of_a_large_block_says_so(arena):
    p = ProcessCache(arena)
    b = p.alloc(10 * 8192)
    p.flush()  # unowned: a free goes through the page map
    before = metadata_bytes(arena)
    for inside in (b.handle + 3 * 8192, b.handle + 9 * 8192 + 64):
        with pytest.raises(
            BadHandle, match=f"handle {inside} is inside a large block of 81920 bytes but not at its start"
        ):
            p.free(inside)
    assert metadata_bytes(arena) == before
    p.free(b)
    assert_healthy(arena, p)
    p.close()


def test_scavenging_any_number_of_free_spans(make_arena):
    """More free spans than one undo log could roll back (1,200 of them, as reported)."""
    arena = make_arena(heap_max=256 << 20)
    p = ProcessCache(arena)
    blocks = [p.alloc(40_000) for _ in range(2400)]
    for b in blocks[::2]:  # every other one: 1,200 free spans that cannot coalesce
        p.free(b)
    p.flush()
    released = arena.scavenge()
    snap = assert_healthy(arena, p)
    assert released >= 1200 * 40960 and snap["heap_released"] == released
    for b in blocks[1::2]:
        p.free(b)
    assert_healthy(arena, p)
    p.close()
