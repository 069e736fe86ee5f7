"""The worker library (client/__init__.py) against the real daemon: its errors, and a forked
child's copy of a Heap."""

import os

import pytest
from support import pattern

import client


def test_client_bad_handles_and_fork(start_daemon):
    d = start_daemon()
    with client.connect(d.endpoint) as heap:
        b = heap.alloc(100)
        b.buf[:] = pattern(b.handle, 100)
        with pytest.raises(client.BadHandle):
            heap.free(b.handle + 8)
        with pytest.raises(client.BadHandle):
            heap.view(12345)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                try:
                    heap.alloc(10)
                    msg = b"no error"
                except client.ForkedHeap:
                    with client.connect(d.endpoint) as own:  # the child's own P works
                        own.free(own.alloc(10))
                        ok = bytes(own.view(b.handle, 100)) == pattern(b.handle, 100)
                    msg = b"ForkedHeap" + (b" own-ok" if ok else b" own-bad")
                os.write(w, msg)
            finally:
                os._exit(0)
        os.close(w)
        out = os.read(r, 100)
        os.close(r)
        os.waitpid(pid, 0)
        assert out == b"ForkedHeap own-ok"
        heap.free(b)
        with pytest.raises(client.DoubleFree):
            heap.free(b)
