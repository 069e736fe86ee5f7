"""Channels (shm/channel.py): blocks from one process to one other through a ring in the heap.
Real processes send and receive blocks of 1 B .. 1 MiB filled with a pattern of their handle;
every one is checked on arrival; a released block goes back to its sender, which frees it; at
the end the heap is empty and consistent.  Then SIGKILL of either end, mid-stream and inside a
loan, and of a process inside the claim of a receiving end; and every misuse, refused with
nothing changed."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys

import mpworkers
import pytest
from support import DEADLINE, ROOT, pattern, spawn_victim

import client
from shm import (
    BadHandle,
    Channel,
    ChannelBusy,
    ChannelClosed,
    DoubleFree,
    ProcessCache,
    identities,
    layout,
    read_stats_slow,
)
from shm import channel as shm_channel
from shm import stats as shm_stats

SPAWN = mp.get_context("spawn")


def assert_empty_and_consistent(arena):
    """Every P gone: nothing allocated, the books balance, fast figures equal the slow walk."""
    arena.reclaim_dead()
    snap = arena.update_stats(stopped=[])
    assert identities(snap) == []
    assert arena.check_all() == []
    assert shm_stats.diff(snap, read_stats_slow(arena)) == []
    assert snap["heap_objects"] == 0, f"{snap['heap_objects']} blocks left allocated"
    assert snap["bad_frees"] == 0
    return snap


def start(target, *args):
    p = SPAWN.Process(target=target, args=args)
    p.start()
    return p


def joined(*procs):
    for p in procs:
        p.join(DEADLINE)
        assert p.exitcode == 0, f"{p.name} exited {p.exitcode}"


# --- two processes ------------------------------------------------------------------------


@pytest.mark.parametrize("take_every", [0, 3], ids=["released", "every third taken"])
def test_blocks_sent_through_a_channel_arrive_whole_and_go_back_to_their_sender(make_arena, take_every):
    arena = make_arena(heap_max=128 << 20)
    handles, results, go = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    n = 600
    sender = start(mpworkers.channel_sender, arena.name, handles, n, 7, go, results)
    h = handles.get(timeout=DEADLINE)
    receiver = start(mpworkers.channel_receiver, arena.name, h, n, results, take_every)
    got = results.get(timeout=DEADLINE)
    go.set()
    sent = results.get(timeout=DEADLINE)
    joined(sender, receiver)
    assert got == sent  # every message, in order, each the block sent (checked on arrival)
    # Its place (the handle without its generation) used again: blocks came back to the sender.
    assert len({h >> layout.GEN_BITS for h, _ in sent}) < n / 2
    snap = assert_empty_and_consistent(arena)
    # Every block freed once: released ones by their sender, taken ones by the receiver.
    assert snap["frees"] == snap["mallocs"]


def test_a_receiver_killed_mid_stream_is_replaced_and_its_unreleased_messages_come_again(make_arena):
    arena = make_arena(heap_max=128 << 20)
    handles, results, go = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    n, first, held = 200, 50, 3
    sender = start(mpworkers.channel_sender, arena.name, handles, n, 11, go, results)
    h = handles.get(timeout=DEADLINE)
    ready = SPAWN.Event()
    victim = start(mpworkers.channel_receiver, arena.name, h, first, results, 0, held, ready)
    assert ready.wait(DEADLINE)
    p = ProcessCache(arena)
    with pytest.raises(ChannelBusy):
        Channel.open(p, h)  # the first receiver is alive
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    rx = Channel.open(p, h)  # its receiver died: open again, from the head
    got = []
    for _ in range(n - first + held):
        mv = rx.recv(timeout=DEADLINE)
        assert bytes(mv) == pattern(rx.last_handle, len(mv))
        got.append((rx.last_handle, len(mv)))
        mv.release()
        rx.release()
    go.set()
    sent = results.get(timeout=DEADLINE)
    joined(sender)
    assert got == sent[first - held :]  # the 3 held by the dead receiver came again, then the rest
    rx.close()  # the sender closed first: the last end frees the ring
    p.close()
    assert_empty_and_consistent(arena)


@pytest.mark.parametrize("in_loan", [False, True], ids=["between messages", "inside a loan"])
def test_a_sender_killed_mid_stream_leaves_its_messages_to_be_received_and_freed(make_arena, in_loan):
    arena = make_arena(heap_max=128 << 20)
    handles, results, ready, never = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event(), SPAWN.Event()
    sent_before = 20  # at most the 16 the ring holds and the 10 received first
    victim = start(
        mpworkers.channel_sender, arena.name, handles, 100, 5, never, results, sent_before, ready, in_loan
    )
    h = handles.get(timeout=DEADLINE)
    p = ProcessCache(arena)
    rx = Channel.open(p, h)
    got = []
    for _ in range(10):  # some received and released while the sender lives
        mv = rx.recv(timeout=DEADLINE)
        got.append((rx.last_handle, len(mv)))
        assert bytes(mv) == pattern(*got[-1])
        mv.release()
        rx.release()
    assert ready.wait(DEADLINE)
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    while True:  # what it sent before it died is still there
        try:
            mv = rx.recv(timeout=DEADLINE)
        except ChannelClosed as e:
            assert "died" in str(e)
            break
        got.append((rx.last_handle, len(mv)))
        assert bytes(mv) == pattern(*got[-1])
        mv.release()
        rx.release()
    assert len(got) == sent_before
    rx.close()  # the sender is dead: this end is the last, and frees the ring, the blocks
    # released and never freed by the dead sender, and a loan it never committed
    p.close()
    assert_empty_and_consistent(arena)


def test_a_process_killed_inside_the_claim_of_a_receiving_end_is_rolled_back(make_arena):
    arena = make_arena()
    p = ProcessCache(arena)
    ch = Channel.create(p, 4)
    victim, ready, _ = spawn_victim(mpworkers.stuck_opening_channel, arena.name, ch.handle)
    assert ready.wait(DEADLINE)
    w = ch._w
    assert w[shm_channel.W_RPID] == victim.pid  # half written: its pid, not its start time
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    repairs = arena.repairs
    rx = Channel.open(p, ch.handle)  # takes the registry lock: the dead claim rolled back first
    assert arena.repairs == repairs + 1
    assert w[shm_channel.W_RPID] == os.getpid()
    b = p.alloc(100)
    b.buf[:] = pattern(b.handle, 100)
    ch.send(b)
    assert bytes(rx.recv(timeout=DEADLINE)) == pattern(b.handle, 100)
    rx.release()
    ch.close()
    rx.close()
    p.close()
    assert_empty_and_consistent(arena)


def test_snapshots_taken_while_workers_stream_through_a_channel_are_consistent(start_daemon):
    d = start_daemon()
    handles, results, go = SPAWN.Queue(), SPAWN.Queue(), SPAWN.Event()
    n = 400
    sender = start(mpworkers.channel_sender, d.endpoint, handles, n, 3, go, results)
    h = handles.get(timeout=DEADLINE)
    receiver = start(mpworkers.channel_receiver, d.endpoint, h, n, results)
    snaps = []
    while results.empty() and len(snaps) < 200:
        snaps.append(client.stats(d.endpoint, slow=True))
    got = results.get(timeout=DEADLINE)
    go.set()
    sent = results.get(timeout=DEADLINE)
    joined(sender, receiver)
    assert got == sent
    assert snaps, "no snapshot taken while the workers ran"
    for s in snaps:
        assert s["consistent"] and s["slow_equal"] and identities(s) == [], s.get("slow_diff")
    final = client.stats(d.endpoint, slow=True)
    assert final["consistent"] and identities(final) == [] and final["heap_objects"] == 0


# --- one process: the ends' rules ----------------------------------------------------------


@pytest.fixture
def ends(arena):
    sender, receiver = ProcessCache(arena), ProcessCache(arena)
    ch = Channel.create(sender, 4)
    rx = Channel.open(receiver, ch.handle)
    yield sender, receiver, ch, rx
    ch.close()
    rx.close()
    sender.close()
    receiver.close()
    assert_empty_and_consistent(arena)


def figures(arena):
    s = read_stats_slow(arena)
    return s["heap_objects"], s["heap_alloc"]


def test_a_full_ring_waits_then_times_out_and_sends_nothing(ends, arena):
    sender, _, ch, rx = ends
    blocks = [sender.alloc(64) for _ in range(5)]
    for b in blocks[:4]:
        ch.send(b)
    with pytest.raises(TimeoutError, match="no room"):
        ch.send(blocks[4], timeout=0.05)
    assert ch.pending == 4
    sender.free(blocks[4])  # still the caller's
    for _ in blocks[:4]:
        assert rx.recv().nbytes == 64
        rx.release()
    with pytest.raises(TimeoutError, match="no message"):
        rx.recv(timeout=0.05)


def test_a_message_of_n_bytes_views_that_many(ends):
    sender, _, ch, rx = ends
    b = sender.alloc(1000)
    b.buf[:] = pattern(b.handle, 1000)
    ch.send(b, 10)
    ch.send(sender.alloc(40000).handle)  # an int handle: the block's whole capacity
    assert bytes(rx.recv()) == pattern(b.handle, 10)
    assert rx.recv().nbytes >= 40000
    rx.release()
    rx.release()


def test_bad_sends_are_refused_and_send_nothing(ends, arena):
    sender, receiver, ch, rx = ends
    gone = sender.alloc(64)
    sender.free(gone)
    before = figures(arena)
    with pytest.raises(BadHandle):
        ch.send(gone)  # freed: a stale handle
    with pytest.raises(BadHandle):
        ch.send(12345)  # no block at all
    b = sender.alloc(64)
    with pytest.raises(BadHandle):
        ch.send(b, 65)  # more than it holds
    with pytest.raises(ChannelClosed, match="receiving end"):
        rx.send(b)
    with pytest.raises(ChannelClosed, match="sending end"):
        ch.recv(timeout=0)
    assert ch.pending == 0 and rx.pending == 0
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.01)  # nothing was sent
    sender.free(b)
    assert figures(arena) == before


def test_loans_one_at_a_time_and_a_cancelled_loan_is_freed(ends, arena):
    sender, _, ch, rx = ends
    before = figures(arena)
    mv = ch.loan(100)
    assert ch.loaned_handle != 0
    with pytest.raises(ValueError, match="not committed"):
        ch.loan(10)
    refused = sender.alloc(8)
    with pytest.raises(ValueError, match="not committed"):
        ch.send(refused)
    mv.release()
    ch.cancel()
    assert ch.loaned_handle == 0
    with pytest.raises(ValueError, match="no loan"):
        ch.commit()
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.01)
    sender.free(refused)  # the caller's still
    assert figures(arena) == before  # the loan's block freed by cancel()


def test_release_and_take_need_a_message_received(ends):
    _, receiver, ch, rx = ends
    with pytest.raises(ValueError, match="no message received"):
        rx.release()
    with pytest.raises(ValueError, match="no message received"):
        rx.take()


def test_a_taken_block_is_the_receivers_and_its_sender_does_not_free_it(ends, arena):
    sender, receiver, ch, rx = ends
    b = sender.alloc(300)
    b.buf[:] = pattern(b.handle, 300)
    ch.send(b)
    rx.recv()
    t = rx.take()
    assert t.handle == b.handle and t.size == 300
    ch.send(sender.alloc(8))  # the sender frees what was released: not the taken block
    assert bytes(receiver.view(t.handle, 300)) == pattern(b.handle, 300)
    receiver.free(t)
    with pytest.raises(DoubleFree):
        receiver.free(t)
    rx.recv()
    rx.release()


def test_opening_what_is_no_channel_or_is_open_already_is_refused(ends, arena):
    sender, receiver, ch, rx = ends
    b = sender.alloc(4096)
    with pytest.raises(BadHandle, match="holds no channel"):
        Channel.open(receiver, b.handle)
    with pytest.raises(BadHandle):
        Channel.open(receiver, b.handle + 1)
    with pytest.raises(ChannelBusy, match="this process"):
        Channel.open(receiver, ch.handle)
    for cap in (0, -1, shm_channel.MAX_CAPACITY + 1, 2.5):
        with pytest.raises(ValueError, match="capacity"):
            Channel.create(sender, cap)
    sender.free(b)


def test_a_receiver_that_closed_stops_the_sender_and_the_last_end_frees_everything(arena):
    sender, receiver = ProcessCache(arena), ProcessCache(arena)
    ch = Channel.create(sender, 8)
    rx = Channel.open(receiver, ch.handle)
    for _ in range(5):
        ch.send(sender.alloc(5000))
    rx.recv()
    rx.release()
    rx.recv()  # held, not released
    rx.close()
    refused = sender.alloc(10)
    with pytest.raises(ChannelClosed, match="receiver closed"):
        ch.send(refused)
    with pytest.raises(ChannelClosed):
        Channel.open(receiver, ch.handle)  # closed by its receiver for good
    ch.close()  # the last end: frees the four in the ring, the refused block is ours
    with pytest.raises(BadHandle):
        receiver.view(ch.handle)  # the ring is gone
    assert figures(arena)[0] == 1  # only the refused block
    sender.free(refused)
    sender.close()
    receiver.close()
    assert_empty_and_consistent(arena)


def test_a_sender_that_closed_first_leaves_its_messages_to_the_receiver(arena):
    sender, receiver = ProcessCache(arena), ProcessCache(arena)
    ch = Channel.create(sender, 8)
    blocks = [sender.alloc(n) for n in (1, 100, 70000)]
    for b in blocks:
        b.buf[:] = pattern(b.handle, b.size)
        ch.send(b)
    ch.close()  # no receiver yet: the ring stays for one
    rx = Channel.open(receiver, ch.handle)
    for b in blocks:
        assert bytes(rx.recv()) == pattern(b.handle, b.size)
        rx.release()
    with pytest.raises(ChannelClosed, match="sender closed"):
        rx.recv(timeout=DEADLINE)
    rx.close()  # the last end
    sender.close()
    receiver.close()
    assert_empty_and_consistent(arena)


def test_channels_are_refused_where_the_memory_order_is_not_x86s(arena, monkeypatch):
    from shm import ChannelUnsupported

    p = ProcessCache(arena)
    monkeypatch.setattr(shm_channel, "_SUPPORTED", False)
    before = figures(arena)
    with pytest.raises(ChannelUnsupported, match="store and load order"):
        Channel.create(p, 4)
    assert figures(arena) == before
    p.close()


def test_a_sent_block_freed_by_hand_is_named_when_the_last_end_closes(arena):
    sender, receiver = ProcessCache(arena), ProcessCache(arena)
    ch = Channel.create(sender, 8)
    rx = Channel.open(receiver, ch.handle)
    wrong, right = sender.alloc(100), sender.alloc(200)
    ch.send(wrong)
    ch.send(right)
    sender.free(wrong)  # a sent block is the channel's: this is the caller's error
    ch.close()
    with pytest.raises(DoubleFree, match=f"1 blocks sent on it were freed elsewhere.*{wrong.handle}"):
        rx.close()  # the last end: frees the rest and the ring, then says what it could not free
    sender.close()
    receiver.close()
    assert_empty_and_consistent(arena)


def test_a_sender_waits_on_while_its_receiver_is_dead_and_a_new_one_lets_it_go_on(arena):
    sender = ProcessCache(arena)
    ch = Channel.create(sender, 2)
    results, ready = SPAWN.Queue(), SPAWN.Event()
    victim = start(mpworkers.channel_receiver, arena.name, ch.handle, 0, results, 0, 0, ready)
    assert ready.wait(DEADLINE)  # its receiving end open, then stopped
    blocks = [sender.alloc(64) for _ in range(3)]
    ch.send(blocks[0])
    ch.send(blocks[1])
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    with pytest.raises(TimeoutError):  # not ChannelClosed: another receiver may open it
        ch.send(blocks[2], timeout=0.05)
    receiver = ProcessCache(arena)
    rx = Channel.open(receiver, ch.handle)
    rx.recv()
    rx.release()
    ch.send(blocks[2], timeout=DEADLINE)  # room again
    for _ in range(2):
        rx.recv()
        rx.release()
    rx.close()
    ch.close()
    sender.close()
    receiver.close()
    assert_empty_and_consistent(arena)


def test_the_readmes_channel_example_runs(start_daemon, tmp_path):
    """The README's example, as written: a pool worker receives 1000 messages of 4 KiB from the
    parent through a channel and sums them; then the heap is empty."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    section = text[text.index("### Blocks from one process to another: channels") :]
    code = section[section.index("```python\n") + 10 : section.index("\n```\n")]
    assert "ch.loan(" in code and "rx.recv(" in code
    script = tmp_path / "channel_example.py"
    script.write_text(code + "\n")
    d = start_daemon()
    env = dict(os.environ, SHMALLOC_ENDPOINT=d.endpoint, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=DEADLINE
    )
    assert out.returncode == 0, out.stderr
    snap = client.stats(d.endpoint, slow=True)
    assert snap["consistent"] and snap["slow_equal"] and identities(snap) == []
    assert snap["heap_objects"] == 0, "the example left blocks allocated"


def _use_inherited_ends(ch, rx, out):
    got = []
    for call in (lambda: ch.loan(8), lambda: ch.send(1), lambda: rx.recv(timeout=0), rx.release, rx.take):
        try:
            call()
            got.append("no error")
        except Exception as e:  # noqa: BLE001 - the test wants every kind reported
            got.append(type(e).__name__)
    ch.close()  # does nothing here
    rx.close()
    out.put(got)


def test_ends_inherited_through_fork_refuse_every_call_and_the_parents_go_on(ends, arena):
    sender, _, ch, rx = ends
    b = sender.alloc(64)
    b.buf[:] = pattern(b.handle, 64)
    ch.send(b)
    assert bytes(rx.recv()) == pattern(b.handle, 64)  # received, not released: the child must
    # not release it for us
    fork = mp.get_context("fork")
    out = fork.Queue()
    child = fork.Process(target=_use_inherited_ends, args=(ch, rx, out))
    child.start()
    assert out.get(timeout=DEADLINE) == ["ForkedHeap"] * 5
    child.join(DEADLINE)
    assert child.exitcode == 0
    assert ch.pending == 1 and rx.pending == 1  # the parent's ends are as they were
    rx.release()
    ch.send(sender.alloc(8))  # and work on
    rx.recv()
    rx.release()


def test_a_process_killed_inside_the_close_of_its_end_is_rolled_back_and_the_other_end_frees_all(arena):
    p = ProcessCache(arena)
    ch = Channel.create(p, 4)
    for _ in range(3):
        ch.send(p.alloc(50_000))
    victim, ready, _ = spawn_victim(mpworkers.stuck_closing_channel, arena.name, ch.handle)
    assert ready.wait(DEADLINE)
    w = ch._w
    assert w[shm_channel.W_RCLOSED] == 1 and w[shm_channel.W_TORN] == 0  # half way
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(DEADLINE)
    repairs = arena.repairs
    ch.close()  # takes the registry lock: the dead close rolled back, then ours -- the last
    assert arena.repairs == repairs + 1
    with pytest.raises(BadHandle):
        p.view(ch.handle)  # torn down: the ring freed, and the blocks in it
    p.close()
    assert_empty_and_consistent(arena)
