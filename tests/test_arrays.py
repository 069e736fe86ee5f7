"""numpy arrays in the heap (client/arrays.py) and out-of-band pickling (client.oob_*), against
the real daemon: references not bytes, the same memory on both sides, slices, the documented
frees -- in one process, a real multiprocessing.Pool (fork and spawn) and a ProcessPoolExecutor."""

import multiprocessing
import pickle
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.reduction import ForkingPickler

import pytest
from poolworkers import array_task, oob_task

import client

np = pytest.importorskip("numpy", reason="numpy is the optional `numpy` extra")


@pytest.fixture
def daemon(start_daemon, monkeypatch):
    d = start_daemon()
    monkeypatch.setenv("SHMALLOC_ENDPOINT", d.endpoint)
    yield d
    client.close_heap()


def live_objects(d):
    return client.stats(d.endpoint)["heap_objects"]


def test_import_client_does_not_import_numpy():
    code = "import sys, client, shm, service.cli; sys.exit('numpy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_ndarray_pickles_as_a_reference_to_the_same_memory(daemon):
    h = client.heap()
    a = h.ndarray((512, 1024), dtype="float64")  # 4 MiB
    assert isinstance(a, np.ndarray) and a.block is not None and a.block.size == a.nbytes
    a[:] = np.arange(a.size, dtype="float64").reshape(a.shape)
    data = pickle.dumps(a)
    assert len(data) < 256 and len(ForkingPickler.dumps(a)) < 256
    b = pickle.loads(data)
    assert np.array_equal(a, b) and b.block.handle == a.block.handle
    b[1, 2] = -1.0
    assert a[1, 2] == -1.0  # the same memory
    for view in (a[3], a[::-3, 5:700:7], a.T, a[10:20].reshape(-1), a.view("int32")[:, 1::2]):
        s = pickle.dumps(view)
        assert len(s) < 300
        got = pickle.loads(s)
        assert got.shape == view.shape and got.dtype == view.dtype and np.array_equal(got, view)
    ro = a[:4]
    ro.flags.writeable = False
    assert not pickle.loads(pickle.dumps(ro)).flags.writeable
    rec = h.ndarray(4, dtype=[("x", "i4"), ("y", "f8")])
    rec["x"] = [1, 2, 3, 4]
    assert list(pickle.loads(pickle.dumps(rec))["x"]) == [1, 2, 3, 4]
    # Not in the block: an ordinary array, pickled by value, refused by free().
    c = a + 1
    assert c.block is None and len(pickle.dumps(c)) > a.nbytes
    assert type(pickle.loads(pickle.dumps(c))) is np.ndarray
    with pytest.raises(TypeError):
        h.free(c)
    with pytest.raises(TypeError, match="Python objects"):
        h.ndarray(3, dtype=object)
    h.free(rec)
    h.free(a)  # frees the block; b and every view are dangling now
    with pytest.raises(client.DoubleFree):
        h.free(b)
    assert live_objects(daemon) == 0


def test_put_an_array_and_oob_in_one_process(daemon):
    h = client.heap()
    x = np.arange(1000, dtype="int16")[::3]  # not contiguous
    blk = h.put(x)
    assert bytes(blk.buf) == x.tobytes()
    h.free(blk)
    obj = {"big": np.ones((256, 1024)), "small": np.arange(5), "text": "hi", "b2": np.ones(70000, "u1")}
    payload = client.oob_dumps(obj)
    assert len(payload) < 1024
    got = client.oob_loads(payload)
    assert got["text"] == "hi" and np.array_equal(got["big"], obj["big"]) and got["b2"].sum() == 70000
    assert np.array_equal(got["small"], obj["small"])
    del got
    assert live_objects(daemon) == 2  # the two large arrays, in the heap
    assert client.oob_free(payload) == 2
    assert live_objects(daemon) == 0


def check_pool_results(h, arrays, results):
    for i, (a, out) in enumerate(zip(arrays, results)):
        assert np.all(a == 2.0 * i)  # the worker's in-place write, seen here: no copy
        assert np.all(out == 2.0 * i + 1) and out.block[3] is h
        h.free(out)  # the parent frees what the workers returned...
        h.free(a)  # ...and its inputs, once the map is done


def make_arrays(h, n=8, shape=(256, 512)):
    arrays = []
    for i in range(n):
        a = h.ndarray(shape)
        a[...] = float(i)
        arrays.append(a)
        assert len(ForkingPickler.dumps(a)) < 1024  # what a task's argument costs
    return arrays


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_map_over_heap_arrays(daemon, method):
    h = client.heap()
    arrays = make_arrays(h)
    with multiprocessing.get_context(method).Pool(2, initializer=client.heap) as pool:
        results = pool.map(array_task, arrays)
        pool.close()
        pool.join()
    check_pool_results(h, arrays, results)
    assert live_objects(daemon) == 0


@pytest.mark.slow
def test_process_pool_executor_over_heap_arrays(daemon):
    h = client.heap()
    arrays = make_arrays(h)
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        results = list(ex.map(array_task, arrays))
    check_pool_results(h, arrays, results)
    assert live_objects(daemon) == 0


@pytest.mark.slow
def test_oob_payload_through_a_pool(daemon):
    obj = {"big": np.zeros(1 << 20), "small": [1, 2, 3]}
    payload = client.oob_dumps(obj)
    assert len(payload) < 1024
    with multiprocessing.get_context("fork").Pool(1) as pool:
        total, small, kind = pool.apply(oob_task, (payload,))
        pool.close()
        pool.join()
    assert (total, small, kind) == (42.0, [1, 2, 3], "ndarray")
    assert client.oob_loads(payload)["big"][0] == 42.0  # the worker wrote into the heap copy
    client.oob_free(payload)  # the rule: whoever is done last frees the payload, once
    assert live_objects(daemon) == 0
