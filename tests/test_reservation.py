"""Metadata reserved by use (shm/layout.py, docs/ARCHITECTURE.md "Every page is reserved before
it is touched"): span records as spans come into use, a worker's P slot at its first claim.  A
reservation that fails is an OutOfMemory with the arena unchanged; a slot never claimed is
never read."""

import os

import mpworkers
import pytest
from support import (
    DEADLINE,
    assert_healthy,
    full_after,
    kill_and_repair,
    metadata_bytes,
    pattern,
    unreserved,
    verify_and_free,
)

from shm import OutOfMemory, ProcessCache
from shm import layout as L

SPAWN = __import__("multiprocessing").get_context("spawn")


def reserved_bytes(arena, off, n):
    """Bytes of the segment's OS pages in [off, off + n) that tmpfs holds, written or only
    reserved (SEEK_DATA sees only the written ones): found by reserving each page again and
    watching st_blocks.  Reserves every page it probes: call it last."""
    fd, page, held = arena.fd, L.OS_PAGE, 0
    for p in range(off // page * page, off + n, page):
        before = os.fstat(fd).st_blocks
        os.posix_fallocate(fd, p, page)
        held += page * (os.fstat(fd).st_blocks == before)
    return held


def test_a_heap_of_few_spans_reserves_few_record_pages(make_arena):
    """200 MiB of 4 MiB blocks: 50 spans in a 256 MiB heap.  The span table holds the pages of
    the records in use (3 OS pages), not a record per committed page (200 pages); the P slots
    region holds the claimed slot, not all 16."""
    arena = make_arena(heap_max=256 << 20, nslots=16)
    lay = arena.lay
    p = ProcessCache(arena)
    blocks = [p.alloc(4 << 20) for _ in range(50)]
    for b in blocks:
        b.buf[:16] = pattern(b.handle, 16)
    high = arena.heap.hget("records_high")
    committed = arena.heap.hget("committed_pages")
    assert high <= 60 and committed * L.PAGE_SIZE >= 200 << 20
    assert unreserved(arena) == []
    for b in blocks:
        assert bytes(b.buf[:16]) == pattern(b.handle, 16)
        p.free(b)
    assert_healthy(arena, p)
    res = arena.resident()
    want_spans = lay.record_pages(high)[1]
    assert res["spans"] == want_spans <= 3 * L.OS_PAGE + lay.span_word(0) * 8 - lay.spans_off
    assert res["slots"] == 3 * lay.slot_words * L.WORD  # slot 0, the daemon's and the registry's
    p.close()
    # The truth, from st_blocks: the span table holds the pages of records [0, records_high) and at
    # most one page reserved ahead of them; the slot region the three slots.
    spans = reserved_bytes(arena, lay.spans_off, lay.pagemap_off - lay.spans_off)
    assert want_spans <= spans <= want_spans + L.OS_PAGE, (spans, want_spans)
    slots = reserved_bytes(arena, lay.slots_off, lay.spans_off - lay.slots_off)
    assert slots == 3 * lay.slot_words * L.WORD, slots


def records_to_page_end(arena):
    """Records from records_high to the end of the span table's last reserved page."""
    lay, high = arena.lay, arena.heap.hget("records_high")
    end = lay.spans_off + lay.record_pages(high)[1]
    return (end - lay.span_word(high) * L.WORD) // (L.SPAN_WORDS * L.WORD)


@pytest.mark.parametrize("size", [100_000, 128])
def test_a_new_record_page_on_a_full_dev_shm_is_out_of_memory_and_changes_nothing(arena, monkeypatch, size):
    """Allocations of 2-page spans (or a 128 B class's: a coarse class, whose map entries come
    with the pages, where a fine class's span reserves its fine map first) take a record each, with /dev/shm full
    from the moment the heap has grown once: they succeed while records fit in the table's
    reserved pages, and the one whose record would reach a new page is OutOfMemory naming
    /dev/shm and the records, the arena unchanged -- never SIGBUS.  Once there is room, the
    same allocation reserves the page and works."""
    p = ProcessCache(arena)
    p.free(p.alloc(8 << 20))
    p.flush()  # the heap grew by 8 MiB, all free: what follows needs records, not pages
    keep = []
    calls = full_after(monkeypatch, 0)
    n = 0
    while True:
        before = metadata_bytes(arena)
        try:
            b = p.alloc(size)
        except OutOfMemory as e:
            assert "/dev/shm is full" in str(e) and "span records" in str(e), e
            break
        b.buf[:] = pattern(b.handle, b.size)
        keep.append(b)
        n += 1
        assert n < 10_000, "the span table never needed a new page"
    assert len(calls) == 1 and arena.lay.spans_off < calls[0][0] < arena.lay.pagemap_off, calls
    assert metadata_bytes(arena) == before
    assert records_to_page_end(arena) == 0 and not arena.heap.hget("free_record")
    monkeypatch.undo()
    b = p.alloc(size)
    b.buf[:] = pattern(b.handle, b.size)
    keep.append(b)
    assert unreserved(arena) == []
    verify_and_free(p, keep)
    assert_healthy(arena, p)
    p.close()


def test_a_scavenger_step_without_room_for_a_record_stops_short(arena, monkeypatch):
    """A scavenger step that must split a span (a budget smaller than the span) needs a record;
    with /dev/shm full at the table's next page it gives back what it can and stops, the arena
    consistent -- giving memory back never fails for want of memory."""
    p = ProcessCache(arena)
    blocks = [p.alloc(100_000) for _ in range(3)]
    for b in blocks:
        p.free(b)
    p.flush()
    # Records of live spans up to the end of the table's reserved pages; then a step that must
    # split the oldest idle span (a budget of one page).
    small = []
    while records_to_page_end(arena) > 0 or arena.heap.hget("free_record"):
        small.append(p.alloc(100_000))
    arena.heap._records_reserved = 0  # as another process, which knows only records_high
    calls = full_after(monkeypatch, 0)
    before = metadata_bytes(arena)
    assert arena.scavenge_step(max_pages=1)[0] == 0
    assert len(calls) == 1 and metadata_bytes(arena) == before
    monkeypatch.undo()
    assert arena.scavenge() > 0
    assert unreserved(arena) == []
    for b in small:
        p.free(b)
    assert_healthy(arena, p)
    p.close()


def test_a_claim_on_a_full_dev_shm_is_out_of_memory_and_changes_nothing(arena, monkeypatch):
    """Two workers claimed slots 0 and 1 and left; their slots are reused without a reservation
    when /dev/shm is full, and the third claim -- slot 2, never claimed -- is OutOfMemory naming
    /dev/shm and the slot, the registry and the header as they were; with room, it works."""
    for p in [ProcessCache(arena) for _ in range(2)]:
        p.close()
    assert list(arena.registry.claimed()) == [0, 1]
    full_after(monkeypatch, 0)
    a, b = ProcessCache(arena), ProcessCache(arena)  # slots 0 and 1 again: nothing to reserve
    assert (a.slot, b.slot) == (0, 1)
    before = metadata_bytes(arena), os.pread(arena.fd, arena.lay.spans_off, 0)
    with pytest.raises(OutOfMemory, match=r"/dev/shm is full: cannot commit P slot 2 "):
        ProcessCache(arena)
    assert (metadata_bytes(arena), os.pread(arena.fd, arena.lay.spans_off, 0)) == before
    assert arena.registry.active_slots() == [0, 1] and arena.check_all() == []
    monkeypatch.undo()
    c = ProcessCache(arena)
    assert c.slot == 2 and list(arena.registry.claimed()) == [0, 1, 2]
    x = c.alloc(1000)
    x.buf[:] = pattern(x.handle, x.size)
    assert unreserved(arena) == []
    assert bytes(x.buf) == pattern(x.handle, x.size)
    c.free(x)
    assert_healthy(arena, a, b, c)
    for p in (a, b, c):
        p.close()


def test_no_reader_touches_a_slot_never_claimed(arena):
    """A worker and the daemon's actor at work, the checks, the figures, a reclaim scan and a
    stop-the-world run over the claimed slots only: the pages of the slots above slots_high
    stay holes (not even read through the mapping, which would make tmpfs hold them)."""
    from shm import world

    lay = arena.lay
    p = ProcessCache(arena)
    blocks = [p.alloc(s) for s in (16, 5000, 100_000) for _ in range(10)]
    for b in blocks:
        p.free(b)
    arena.update_stats(stopped=[p.slot])
    assert arena.check_all() == []
    arena.read_stats_slow()
    arena.reclaim_dead()
    stw = world.StopTheWorld(arena, asymmetric=False)
    stw.begin(1)
    stw.end(set())
    lo = lay.slot_word(1) * L.WORD
    hi = lay.slot_word(lay.nslots) * L.WORD
    try:
        data = os.lseek(arena.fd, lo, os.SEEK_DATA)
    except OSError:
        data = None
    assert data is None or data >= hi, f"a never-claimed slot's page at {data} was touched"
    assert reserved_bytes(arena, lo, hi - lo) == 0
    p.close()


@pytest.mark.parametrize("where", ["reserved", "written"])
def test_sigkill_inside_a_claim_leaves_a_consistent_arena(make_arena, where):
    """A worker killed inside its claim of a new slot -- right after the slot's reservation, or
    after its first words were written -- leaves the registry lock dirty.  The next claim rolls
    the dead one back and takes the same slot (reserved already: the reservation is made again
    for nothing); the arena checks clean and the slot works."""
    arena = make_arena(heap_max=32 << 20, nslots=8)
    ready = SPAWN.Event()
    victim = SPAWN.Process(target=mpworkers.stuck_in_claim, args=(arena.name, where, ready))
    victim.start()
    assert ready.wait(DEADLINE), "victim never reached its claim"
    assert arena.q[arena.lay.lock_word(L.LOCK_REGISTRY)] == arena.registry_actor + 1
    high = arena.q[L.HDR["slots_high"]]
    assert high == (0 if where == "reserved" else 1)
    p = kill_and_repair(arena, victim, lambda: ProcessCache(arena))  # a claim: the registry lock
    assert p.slot == 0
    assert list(arena.registry.claimed()) == [0] and arena.registry.active_slots() == [0]
    b = p.alloc(3000)
    b.buf[:] = pattern(b.handle, b.size)
    assert unreserved(arena) == []
    assert bytes(b.buf) == pattern(b.handle, b.size)
    p.free(b)
    assert_healthy(arena, p)
    p.close()
