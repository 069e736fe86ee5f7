"""deploy/examples/demo_worker.py against a fake heap (no daemon needed)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from support_deploy import DEMO_WORKER


def load_demo_worker():
    spec = importlib.util.spec_from_file_location("demo_worker", DEMO_WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class FakeHeap:
    """The public API of client.Heap that demo_worker.py uses, in a bytearray."""

    def __init__(self, corrupt: bool = False):
        self.mem = bytearray(1 << 20)
        self.top = 0
        self.live: dict[int, int] = {}
        self.mallocs = self.frees = 0
        self.corrupt = corrupt

    def alloc(self, size):
        class Block:
            pass

        blk = Block()
        blk.handle, blk.size, blk.capacity = self.top, size, size
        blk.buf = memoryview(self.mem)[self.top : self.top + size]
        self.live[self.top] = size
        self.top += size
        self.mallocs += 1
        return blk

    def free(self, blk):
        handle = getattr(blk, "handle", blk)
        del self.live[handle]
        self.frees += 1

    def view(self, handle):
        mv = memoryview(self.mem)[handle : handle + self.live[handle]]
        return bytes(len(mv)) if self.corrupt else mv

    def stats(self):
        return {
            "consistent": True,
            "epoch": self.mallocs,
            "num_p": 1,
            "heap_alloc": sum(self.live.values()),
            "heap_objects": self.mallocs - self.frees,
            "sys": len(self.mem),
            "pause_ns": 1000,
        }


def test_demo_worker_round_frees_what_it_allocates():
    demo = load_demo_worker()
    heap = FakeHeap()
    line = demo.one_round(heap, [64, 1000, 40000], 0)
    assert line["heap_objects"] == 3 and line["heap_alloc"] == 64 + 1000 + 40000
    assert len(line["handles"]) == 3
    assert heap.live == {} and heap.mallocs == heap.frees == 3
    json.dumps(line)


def test_demo_worker_detects_bad_readback_and_still_frees():
    demo = load_demo_worker()
    heap = FakeHeap(corrupt=True)
    with pytest.raises(RuntimeError, match="read back"):
        demo.one_round(heap, [64, 128], 0)
    assert heap.live == {}


@pytest.mark.parametrize(
    "args", [["--sizes", "0"], ["--sizes", "a,b"], ["--rounds", "-1"], ["--interval", "-1"]]
)
def test_demo_worker_rejects_bad_arguments(args):
    demo = load_demo_worker()
    with pytest.raises(SystemExit) as e:
        demo.parse_args(args)
    assert e.value.code == 2


def test_demo_worker_help_needs_no_package():
    r = subprocess.run(
        [sys.executable, str(DEMO_WORKER), "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and "--rounds" in r.stdout
