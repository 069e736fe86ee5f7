"""Misuse at the edges: sizes that are no int or negative, a handle on an interior page of a
large block, scavenging any number of free spans.  Each error names the problem, is one of the
error tree, and changes nothing."""

import pytest
from support import assert_healthy, metadata_bytes

from shm import BadHandle, BadSize, BadSizeType, ProcessCache, ShmallocError, layout
from shm.cache import Block


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


def test_the_buf_of_a_block_freed_since_or_made_by_hand_raises_and_changes_nothing(arena):
    """Block.buf of a block of one's own skips the span lookup (its class read from the P's page
    table) only while the map byte says the block is the P's and live: a Block freed since --
    its object handed out again or not -- raises as view() does, and so does one made by hand
    that asks for more than its class holds or names no block; the arena unchanged."""
    p = ProcessCache(arena)
    b = p.alloc(64)
    b.buf[:] = bytes(range(64))
    assert bytes(b.buf) == bytes(range(64)) and len(b.buf) == 64
    p.free(b)
    before = metadata_bytes(arena)
    with pytest.raises(BadHandle, match="not a live block"):
        _ = b.buf
    assert metadata_bytes(arena) == before
    again = p.alloc(64)  # the same object, its next generation
    assert again.handle >> layout.GEN_BITS == b.handle >> layout.GEN_BITS
    before = metadata_bytes(arena)
    with pytest.raises(BadHandle, match="stale"):
        _ = b.buf
    with pytest.raises(BadHandle, match="view of 65 bytes of a block of 64"):
        _ = Block((again.handle, 65, 64, p)).buf
    for h in (again.handle + (8 << layout.GEN_BITS), 5, 1 << 62):  # inside no block, below, past
        with pytest.raises(BadHandle):
            _ = Block((h, 8, 64, p)).buf
    assert metadata_bytes(arena) == before
    p.free(again)
    p.close()
