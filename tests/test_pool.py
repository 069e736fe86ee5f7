"""client.heap() and Blocks that pickle as references (client/pool.py), against the real
daemon: in one process, in a forked child, in a real multiprocessing.Pool (fork and spawn), and a
reference to a stopped daemon's arena."""

import multiprocessing
import os
import pickle
from multiprocessing.reduction import ForkingPickler

import pytest
from poolworkers import block_task

import client


@pytest.fixture
def daemon(start_daemon, monkeypatch):
    """A daemon, $SHMALLOC_ENDPOINT naming it (for client.heap() here and in every child), and
    this process's default heap closed before the daemon stops."""
    d = start_daemon()
    monkeypatch.setenv("SHMALLOC_ENDPOINT", d.endpoint)
    yield d
    client.close_heap()


def live_objects(d):
    return client.stats(d.endpoint)["heap_objects"]


def test_heap_is_this_process_default(daemon):
    h = client.heap()
    assert client.heap() is h and h.endpoint == daemon.endpoint
    with pytest.raises(ValueError, match="default heap is connected to"):
        client.heap("ipc:///nowhere/else.sock")
    client.close_heap()
    assert h._closed
    h2 = client.heap()
    assert h2 is not h
    assert live_objects(daemon) == 0


def test_block_pickles_as_a_reference(daemon):
    h = client.heap()
    for size in (0, 10, 5000, 1 << 20, 8 << 20):
        blk = h.alloc(size)
        blk.buf[:] = b"z" * size
        data = pickle.dumps(blk)
        assert len(data) < 100, len(data)
        assert len(ForkingPickler.dumps(blk)) < 100
        got = pickle.loads(data)
        assert type(got) is type(blk) and tuple(got[:3]) == tuple(blk[:3])
        assert bytes(got.buf) == b"z" * size
        h.free(got)
        with pytest.raises(client.DoubleFree):
            h.free(blk)
        with pytest.raises(client.BadHandle):  # a reference to a freed block loads as an error
            pickle.loads(data)
    assert live_objects(daemon) == 0


def test_put_and_block_as_context_manager(daemon):
    h = client.heap()
    for data in (b"", b"abc", bytearray(b"x" * 70000), memoryview(b"0123456789")[::2]):
        blk = h.put(data)
        assert blk.size == len(bytes(data)) and bytes(blk.buf) == bytes(data)
        h.free(blk)
    with h.alloc(100) as blk:
        blk.buf[:3] = b"abc"
    with pytest.raises(client.DoubleFree):
        h.free(blk)
    with pytest.raises(KeyError), h.put(b"freed even on an error") as blk:
        raise KeyError
    with pytest.raises(client.DoubleFree):
        h.free(blk)
    assert live_objects(daemon) == 0


def test_forked_child_gets_a_heap_of_its_own(daemon):
    h = client.heap()
    blk = h.put(b"parent")
    data = pickle.dumps(blk)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            mine = client.heap()
            got = pickle.loads(data)
            msg = b"own" if mine is not h and got[3] is mine else b"reused"
            got.buf[:] = b"child!"
            client.close_heap()
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    out = os.read(r, 100)
    os.close(r)
    os.waitpid(pid, 0)
    assert out == b"own"
    assert bytes(blk.buf) == b"child!"
    assert client.heap() is h  # the child's exit closed its heap, not ours
    h.free(blk)
    assert live_objects(daemon) == 0


def test_reference_to_a_stopped_daemons_arena(daemon, start_daemon):
    h = client.heap()
    blk = h.put(b"gone with its daemon")
    old_id = h.arena.arena_id
    data = pickle.dumps(blk)
    client.close_heap()
    assert daemon.stop() == 0
    d2 = start_daemon(endpoint=daemon.endpoint)  # same endpoint, a new arena
    with pytest.raises(client.ForeignReference) as e:
        pickle.loads(data)
    new_id = client.heap().arena.arena_id
    assert f"{old_id:#018x}" in str(e.value) and f"{new_id:#018x}" in str(e.value)
    assert "stopped since" in str(e.value)
    assert isinstance(e.value, client.ShmallocError) and isinstance(e.value, ValueError)
    assert live_objects(d2) == 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_map_over_blocks(daemon, method):
    h = client.heap()
    blocks = []
    for i in range(8):
        blk = h.alloc(1000 + 70000 * i)
        blk.buf[:] = bytes([blk.handle % 251]) * blk.size
        blocks.append(blk)
    ctx = multiprocessing.get_context(method)
    with ctx.Pool(2, initializer=client.heap) as pool:
        results = pool.map(block_task, blocks)
        pool.close()
        pool.join()
    for blk, (out, size) in zip(blocks, results):
        assert bytes(out.buf) == b"ok" and out[3] is h  # loaded through our default heap
        assert size < 100
        assert blk.buf[0] == 0xAB  # the worker's write, no copy
        h.free(out)  # the parent frees what the workers returned...
        h.free(blk)  # ...and its inputs, after the map
    assert live_objects(daemon) == 0
