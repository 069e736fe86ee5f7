"""Frees of objects another P caches (shm/cache.py's remote-free buffer, Arena._apply_buffer):
buffered in the freer's slot, hinted RFREED at once, applied in batches under one acquisition of
each lock, flushed by every snapshot first; bad frees found late are counted and never applied
twice; a process killed while applying its batch is rolled back and the batch applied once."""

import os
import signal

import mpworkers
import pytest
from support import DEADLINE, assert_healthy, metadata_bytes, pattern

from shm import DoubleFree, ProcessCache, cache, identities, layout, read_stats_slow
from shm import stats as shm_stats

SL = layout.SLOT


def buffered(arena, p):
    return [h for h in arena.buffered_frees(p.slot) if h]


def test_a_remote_free_is_buffered_hinted_and_applied_in_one_batch(arena):
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(layout.RFREE_CAP + 10)]
    for b in blocks[: layout.RFREE_CAP]:
        freer.free(b)
    # All in the buffer, each hinted RFREED, nothing applied: the central counters are untouched.
    assert buffered(arena, freer) == [b.handle for b in blocks[: layout.RFREE_CAP]]
    amap = arena.mv
    assert {amap[arena.lay.amap_byte(b.handle)] for b in blocks[: layout.RFREE_CAP]} == {layout.RFREED}
    # The slow walk already counts them free (the calls returned); the snapshot will too.
    assert read_stats_slow(arena)["heap_objects"] == 10
    freer.free(blocks[layout.RFREE_CAP])  # the buffer is full: this free applies it first
    assert buffered(arena, freer) == [blocks[layout.RFREE_CAP].handle]
    states = {amap[arena.lay.amap_byte(b.handle)] for b in blocks[: layout.RFREE_CAP]}
    assert states <= {layout.PENDING, layout.FREE}  # owner's spans: PENDING; uncached ones: FREE
    for b in blocks[layout.RFREE_CAP + 1 :]:
        owner.free(b)
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["frees"] == len(blocks) and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_a_second_free_of_a_buffered_block_fails_at_once_and_changes_nothing(arena):
    owner, freer, third = ProcessCache(arena), ProcessCache(arena), ProcessCache(arena)
    small, large = owner.alloc(100), owner.alloc(100_000)
    for b in (small, large):
        freer.free(b.handle)
        before = metadata_bytes(arena)
        for p in (owner, freer, third):
            with pytest.raises(DoubleFree):
                p.free(b.handle)
        assert metadata_bytes(arena) == before
    snap = assert_healthy(arena, owner, freer, third)
    assert snap["heap_objects"] == 0 and snap["bad_frees"] == 0
    for p in (owner, freer, third):
        p.close()


def test_a_lost_hint_still_frees_exactly_once(arena):
    """A retag under the central lock may overwrite the RFREED hint with an allocated state (it
    never hands the object out): the buffered free then applies on that state."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(4)]
    for b in blocks:
        freer.free(b)
    off = arena.lay.amap_byte(blocks[0].handle)
    arena.mv[off] = layout.TAG0 + owner.slot  # what a concurrent collect would write back
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and snap["frees"] == 4 and snap["bad_frees"] == 0
    owner.close()
    freer.close()


def test_a_free_found_bad_when_applied_is_counted_logged_and_not_applied(arena, caplog):
    """A double free split across processes whose hint was lost: the owner freed the block too,
    so when the buffer is applied the object is free already -- counted, never applied twice."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    victim, other = owner.alloc(64), owner.alloc(64)
    freer.free(victim)
    off = arena.lay.amap_byte(victim.handle)
    arena.mv[off] = layout.TAG0 + owner.slot  # the hint is lost...
    owner.free(victim)  # ...so the owner's own free goes through: LISTED again
    with caplog.at_level("WARNING", logger="shmalloc.arena"):
        freer.flush()
    assert "found bad when applied" in caplog.text
    again = owner.alloc(64)  # the owner's list hands it out once more, to one owner
    assert again.handle == layout.next_handle(victim.handle)
    again.buf[:] = pattern(again.handle, 64)
    owner.free(other)
    snap = assert_healthy(arena, owner, freer)
    assert snap["bad_frees"] == 1 and snap["heap_objects"] == 1
    assert bytes(owner.view(again)[:64]) == pattern(again.handle, 64)
    owner.free(again)
    snap = assert_healthy(arena, owner, freer)
    assert snap["heap_objects"] == 0 and identities(snap) == []
    owner.close()
    freer.close()


def test_every_snapshot_flushes_the_buffers_first(arena):
    """The seed's lesson applied to the new cache: a snapshot that read before applying the
    buffered frees would count them live."""
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(1000) for _ in range(20)]
    owner.flush()  # the owner caches nothing now: only the freer's buffer holds news
    for b in blocks[:15]:
        freer.free(b)
    wrong = shm_stats.read_stats(arena)  # the seed bug, built on purpose: read before flushing
    assert wrong["heap_objects"] == 20
    snap = arena.update_stats(stopped=[owner.slot, freer.slot])
    assert snap["heap_objects"] == 5 and identities(snap) == []
    assert arena.q[arena.lay.slot_word(freer.slot) + SL["rfree_n"]] == 0
    for b in blocks[15:]:
        owner.free(b)
    assert_healthy(arena, owner, freer)
    owner.close()
    freer.close()


def test_closing_applies_the_buffer(arena):
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    blocks = [owner.alloc(64) for _ in range(30)]
    for b in blocks:
        freer.free(b)
    freer.close()
    snap = assert_healthy(arena, owner)
    assert snap["heap_objects"] == 0 and snap["frees"] == 30
    owner.close()


@pytest.mark.slow
@pytest.mark.parametrize("nth", [1, 2])
def test_sigkill_while_applying_a_batch_rolls_back_and_applies_it_once(make_arena, nth):
    """The victim dies inside its batch's operation (central and heap locks held, the `nth`
    span's frees written; with nth 2 the first span's were checkpointed, the buffer's count
    dropped below them).  The next taker of the lock rolls that span back; the reclaim applies
    the rest of the batch, so every free is applied exactly once."""
    import multiprocessing as mp

    arena = make_arena(heap_max=64 << 20, nslots=8)
    main = ProcessCache(arena)
    ready, out = mp.get_context("spawn").Event(), mp.get_context("spawn").Queue()
    victim = mp.get_context("spawn").Process(
        target=mpworkers.stuck_applying_frees, args=(arena.name, ready, out, nth)
    )
    victim.start()
    assert ready.wait(DEADLINE), "victim never reached its critical section"
    n_alloc, n_buffered = out.get(timeout=DEADLINE)
    dirty = [lid for lid in range(layout.NLOCKS) if arena.q[arena.lay.lock_word(lid)]]
    assert dirty, "the victim should hold a dirty lock"
    mine = [k for k in arena.registry.active_slots() if arena.registry.pid(k) == victim.pid]
    left = max(arena.q[arena.lay.slot_word(k) + layout.SLOT["rfree_n"]] for k in mine)
    # The first span's frees checkpointed: the count no longer holds them (nth 1: nothing yet).
    assert (left == n_buffered) if nth == 1 else (0 < left < n_buffered)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    repairs = arena.repairs
    other = ProcessCache(arena)
    b = other.alloc(64)  # takes central[64 B], which the victim died holding
    assert arena.repairs == repairs + 1
    other.free(b)
    snap = assert_healthy(arena, main, other)  # reclaims the victim: its batch applied now, once
    assert snap["heap_objects"] == n_alloc - n_buffered and snap["bad_frees"] == 0
    assert snap["frees"] == n_buffered + 1
    other.close()
    main.close()


def test_many_large_blocks_freed_by_another_process_go_back_in_bounded_steps(make_arena):
    """More PENDING large spans than one undo log could roll back.  The owner's next large slow
    path takes a cache's worth back, leaves one remote-free buffer's worth waiting for its next
    allocations, and gives the oldest others back to the heap, a checkpoint after each; a
    snapshot's flush leaves the waiting ones alone; closing gives them back."""
    arena = make_arena(heap_max=1 << 30, nslots=4)
    owner, freer = ProcessCache(arena), ProcessCache(arena)
    n = 2 * layout.RFREE_CAP
    blocks = [owner.alloc(300_000) for _ in range(n)]
    for b in blocks:
        freer.free(b)
    freer.flush()  # applied: every span PENDING for its owner
    sw = arena.lay.slot_word(owner.slot)
    assert arena.q[sw + SL["lg_pending"]] == n
    order = [arena.large.base(r) for r in arena.large.pending(owner.slot)]  # newest first
    b = owner.alloc(2 << 20)  # a large slow path: collects them
    kept = sum(len(v) for v in owner._lcache.values())
    assert kept == cache.LARGE_CACHE_SPANS
    assert arena.q[sw + SL["lg_pending"]] == cache.LARGE_PENDING_SPANS
    waiting = {arena.large.base(r) for r in arena.large.pending(owner.slot)}
    assert waiting == set(order[kept : kept + cache.LARGE_PENDING_SPANS]), "the oldest went back"
    # A snapshot's flush (the daemon's: live blocks stay owned) leaves the waiting spans.
    arena.flush_slots([owner.slot, freer.slot], keep_empty=True, disown=False)
    assert arena.q[sw + SL["lg_pending"]] == cache.LARGE_PENDING_SPANS
    snap = arena.read_stats()
    assert identities(snap) == [] and arena.check_all() == []
    assert shm_stats.diff(snap, read_stats_slow(arena)) == []
    assert snap["large_frees"] == n and snap["bad_frees"] == 0
    again = owner.alloc(300_000)  # the newest waiting span, taken back into the cache
    assert again.handle in waiting
    owner.free(again)
    owner.free(b)
    owner.close()  # gives back every span it still had
    assert arena.q[sw + SL["lg_pending"]] == 0 and arena.q[sw + SL["lg_pend_head"]] == 0
    snap = assert_healthy(arena, freer)
    assert snap["heap_objects"] == 0 and snap["large_frees"] == n + 2
    freer.close()
