"""Where the time of an alloc+free pair goes: the fast path taken apart.

    python bench/bench_fastpath.py [--n 300000] [--reps 7] [--show]

1. A replica of ProcessCache's alloc/free closures, timed whole and with one piece at a time
   removed or swapped.  The replica is no copy: it is compiled from the source of
   `ProcessCache._bind_fast_path` in shm/cache.py itself (the statements up to `def free`),
   with the piece taken out of the AST, and bound to a private anonymous shared mapping
   (mmap(-1)) laid out as a P slot plus an allocation map -- so `inside`, the stop byte and
   `relists` are real shared memory, the relists a 'Q' view, as in an arena.  The script
   checks that the replica as shipped has the bytecode of the real closures, and that every
   removed piece was found and is gone (so it fails, rather than measures the wrong thing, once
   the fast path changes again).  --show prints every variant's alloc and free.
     as shipped                  the closures as they are
     without the Block tuple     alloc returns the int handle; free takes it as is
     without the owner check     no `get_ident() == owner`
     without the inside stores   no `inside` byte set and cleared around the call: the price
                                 of the stop-the-world handshake (shm/world.py) on the fast path
     without the stop-byte read  no `not stop[0]`
     without the relists count   no `relists[c] += 1`: the price of counting local re-lists
                                 in shared memory
     bare                        none of the five
     a threading.Lock per call   the inside byte's store and clear swapped for a Lock's
                                 acquire and release (the stop byte still read)
   The differences from "as shipped" are what each piece costs.
2. The real thing, on a real arena (shm.Arena.create + shm.ProcessCache, no daemon):
     real pair 64 B              alloc(64)+free(block), the owner thread
     real pair 1 MiB             served from the P's large cache: no lock, no locked operation
     real local free             a P frees its own 64 B blocks (taken 64 at a time from the span
                                 it caches, so every free is local): ns per free
     real remote free            one P allocates N 64 B blocks, a second frees them: ns per free,
                                 its batch applies (one locked operation per 256 frees) amortized
     real pair, shared mode      after a second thread used the cache: every call takes the
                                 P's threading.Lock (the slow path, still no locked operation)
     real view / Block.buf       view(h) of a live 64 B block by its owner, view(h, 64) by
                                 another P, and the Block's .buf (each with its loop and a call)
     refill                      one refill of a 64 B span: the collect, under its central lock,
                                 of a span whose 128 objects another P freed (its batch applied)
   A pair loop never meets a refill now: a local free re-lists the block, so the list it pops
   from never empties.  The script counts the refills its real 64 B pairs met (0 after warm-up).

Every row is timed round robin (each repetition times every row, so a shared machine's drift
hits them all alike) and is the median of its --reps repetitions, in ns per pair (per free for
the free rows, per refill for the refill).  Machines are shared and noisy: compare the rows of
one run.
"""

import _thread
import argparse
import ast
import copy
import inspect
import mmap
import os
import sys
import threading
import time
import types
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _benchlib import count_calls  # noqa: E402
from bench_alloc import pairs  # noqa: E402 - one pair loop for every bench

from shm import cache  # noqa: E402
from shm import layout as L  # noqa: E402
from shm.sizeclasses import CLASS_TO_ALLOCNPAGES, CLASS_TO_NOBJS, CLASS_TO_SIZE, SIZE_TO_CLASS  # noqa: E402

C64 = SIZE_TO_CLASS[8]
PAIR = "real pair 64 B, owner thread"
PAIR_1M = "real pair 1 MiB (the P's large cache, no lock)"
LOCAL = "real local free 64 B (per free)"
REMOTE = "real remote free 64 B (per free, applies amortized)"
SHARED = "real pair 64 B, shared mode (after a 2nd thread)"
VIEW = "real view(h) of a 64 B block, by its owner"
VIEW_OTHER = "real view(h, 64) of it, by another P"
BUF = "real Block.buf of it"
REFILL = "refill: one refill of a 64 B span"
PIECES = {  # piece: names the closures must no longer mention once it is removed
    "block": {"B", "cls"},
    "owner": {"owner", "get_ident"},
    "inside": {"ins", "inside"},
    "stop": {"stop"},
    "relists": {"relists"},
}


class Strip(ast.NodeTransformer):
    """Take `pieces` out of the closures' AST; `lock` swaps the inside byte for a Lock."""

    CHECKS = {"get_ident() == owner": "owner", "not stop[0]": "stop"}

    def __init__(self, pieces, lock):
        self.pieces, self.lock = set(pieces), lock
        self.hits = dict.fromkeys(self.pieces | ({"lock"} if lock else set()), 0)
        stmts = {}  # statement -> (piece, replacement or None)
        if "block" in self.pieces:
            stmts["cls = block.__class__"] = ("block", None)
            stmts[
                "h = block[0] if cls is B and (block[3] is self or block[3].arena is arena) "
                "else block if cls is int else _handle(block, self)"
            ] = (
                "block",
                "h = block",
            )
        if "inside" in self.pieces or lock:
            piece = "lock" if lock else "inside"
            stmts["ins = inside"] = (piece, None)
            stmts["ins[0] = 1"] = (piece, "acquire()" if lock else None)
        if "relists" in self.pieces:
            stmts["relists[c] += 1"] = ("relists", None)
        self.stmts = stmts

    def removed(self, test):
        piece = self.CHECKS.get(ast.unparse(test))
        if piece in self.pieces:
            self.hits[piece] += 1
            return True
        return False

    def visit_If(self, node):
        self.generic_visit(node)
        t = node.test
        if isinstance(t, ast.BoolOp) and isinstance(t.op, ast.And):
            t.values = [v for v in t.values if not self.removed(v)]
            if len(t.values) == 1:
                node.test = t.values[0]
        elif self.removed(t):
            assert not node.orelse, ast.unparse(node)
            return node.body
        return node

    def visit_Try(self, node):
        self.generic_visit(node)
        if [ast.unparse(s) for s in node.finalbody] == ["ins[0] = 0"]:
            if self.lock:
                self.hits["lock"] += 1
                node.finalbody = ast.parse("release()").body
            elif "inside" in self.pieces:
                self.hits["inside"] += 1
                if not node.handlers:
                    return node.body
                node.finalbody = []  # the handlers stay (a generation wrap, in free)
        return node

    def statement(self, node):
        src = ast.unparse(node)
        if "block" in self.pieces and isinstance(node, ast.Return) and src.startswith("return B((h, "):
            self.hits["block"] += 1
            return ast.parse("return h").body[0]
        if src in self.stmts:
            piece, new = self.stmts[src]
            self.hits[piece] += 1
            return ast.parse(new).body[0] if new else None
        return node

    visit_Assign = visit_AugAssign = visit_Return = statement


def _bind_source():
    """The AST of ProcessCache._bind_fast_path, as shm/cache.py has it."""
    tree = ast.parse(inspect.getsource(cache))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ProcessCache")
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "_bind_fast_path")


def replica_source(pieces=(), lock=False):
    """_bind_fast_path cut after `def free` (returning alloc, free), with `pieces` removed from
    both closures."""
    fn = copy.deepcopy(_bind_source())
    end = next(i for i, n in enumerate(fn.body) if isinstance(n, ast.FunctionDef) and n.name == "free")
    body = fn.body[: end + 1]
    strip = Strip(pieces, lock)
    for i, n in enumerate(body):
        if isinstance(n, ast.FunctionDef):
            body[i] = strip.visit(n)
    missed = [p for p, k in strip.hits.items() if not k]
    assert not missed, f"not found in shm/cache.py's fast path: {missed}"
    left = {
        x.id
        for n in body
        if isinstance(n, ast.FunctionDef)
        for x in ast.walk(n)
        if isinstance(x, ast.Name)
        and x.id in set().union(*(PIECES[p] for p in pieces), PIECES["inside"] if lock else ())
    }
    assert not left, f"{pieces}: still in the closures: {left}"
    if lock:  # two more cells, bound as the others are
        body.insert(end - 1, ast.parse("acquire, release = self._lk.acquire, self._lk.release").body[0])
    body.append(ast.parse("return alloc, free").body[0])
    fn.body = body
    return ast.fix_missing_locations(ast.Module([fn], []))


class _Replica(types.SimpleNamespace):
    """The state _bind_fast_path reads from a ProcessCache."""


def replica(pieces=(), lock=False):
    """(alloc, free) compiled from shm/cache.py without `pieces`, over a private shared mapping:
    slot words (stop, inside, relists, remote-free buffer) and an allocation map, as an arena
    lays them out, one cached 64 B span listed.  The slow paths raise: a pair never takes them."""
    ns = dict(vars(cache))  # the module's globals: Block, the size-class tables, _handle, ...
    exec(compile(replica_source(pieces, lock), "<replica of shm/cache.py>", "exec"), ns)
    heap = 1 << 26  # a 64 MiB heap, as the real arena below
    lay = L.Layout(heap, 1)  # the maps' two parts, as ProcessCache indexes them
    amap_off = ((L.SLOT_RFREE_AT + L.RFREE_CAP) * 8 + L.PAGE_SIZE - 1) & -L.PAGE_SIZE
    gmap_off = amap_off + lay.amap_bytes
    buf = mmap.mmap(-1, gmap_off + lay.amap_bytes)  # anonymous, MAP_SHARED; the heap itself is never
    mv = memoryview(buf)  # touched by the fast path: not mapped
    q = mv.cast("Q")
    size, nobjs = CLASS_TO_SIZE[C64], CLASS_TO_NOBJS[C64]
    lists = [[] for _ in range(L.NCLASS)]
    lists[C64] = [lay.make_handle(i * size, 0, C64) for i in range(nobjs - 1, -1, -1)]  # pop(): ascending
    g0 = L.HANDLE_G0  # the maps as ProcessCache views them: indexed by handle >> GEN_BITS
    amap = mv[amap_off - g0 : amap_off + lay.amap_bytes]
    for h in lists[C64]:
        amap[h >> L.GEN_BITS] = L.LISTED
    pages = heap >> L.PAGE_SHIFT
    pclass = bytearray(pages + 1) + bytes((cache._COARSE,)) * (pages // 16 + 2)
    pclass[1 : 1 + CLASS_TO_ALLOCNPAGES[C64]] = bytes([C64]) * CLASS_TO_ALLOCNPAGES[C64]
    SL = L.SLOT

    def slow(*_):
        raise AssertionError("the replica took the slow path")

    p = _Replica(
        _buf=buf,
        _lists=lists,
        _amap=amap,
        _gmap=mv[gmap_off - g0 : gmap_off + lay.amap_bytes],
        _tag=L.TAG0,
        _pclass=pclass,
        _cpclass=bytearray(pages),
        arena=types.SimpleNamespace(lay=lay, q=q, mv=mv, block_capacity=slow),
        _relists=q[L.SLOT_RELISTS_AT : L.SLOT_RELISTS_AT + L.NCLASS],
        _lcache={},
        _lnp={},
        _lcap=(heap // 4) >> L.PAGE_SHIFT,
        _lmin=((heap // 4) >> L.PAGE_SHIFT) // 8,
        _rbuf=q[L.SLOT_RFREE_AT : L.SLOT_RFREE_AT + L.RFREE_CAP],
        _rfree_n=q[SL["rfree_n"] : SL["rfree_n"] + 1],
        _lgrel=q[SL["lg_relists"] : SL["lg_relists"] + 2],
        _rlarge=[0, 0],
        _rlcap=(heap // 4) >> L.PAGE_SHIFT,
        owner_thread=_thread.get_ident(),
        _shm_stop=mv[SL["stop"] * 8 : SL["stop"] * 8 + 1],
        _inside=mv[SL["inside"] * 8 : SL["inside"] * 8 + 1],
        _slow_alloc=slow,
        _slow_free=slow,
        _lk=threading.Lock(),
    )
    return ns["_bind_fast_path"](p)


def same_code(f, g):
    a, b = f.__code__, g.__code__
    return all(
        getattr(a, k) == getattr(b, k)
        for k in ("co_code", "co_consts", "co_names", "co_varnames", "co_freevars")
    )


def clocked(loop):
    """A row: loop(n) timed whole; returns (ns, n)."""

    def run(n):
        t = time.perf_counter_ns()
        loop(n)
        return time.perf_counter_ns() - t, n

    return run


def sized_pairs(alloc, free, size):
    def run(n):
        for _ in range(n):
            free(alloc(size))

    return run


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300_000)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--show", action="store_true", help="print every variant's alloc and free, and exit")
    a = ap.parse_args(argv)

    variants = [
        ("replica, as shipped", (), False, ""),
        (
            "  without the Block tuple (ints)",
            ("block",),
            False,
            "the Block tuple: made in alloc, indexed in free",
        ),
        ("  without the owner-thread check", ("owner",), False, "get_ident() == owner, in alloc and in free"),
        (
            "  without the inside byte stores",
            ("inside",),
            False,
            "the stop-the-world handshake on the fast path",
        ),
        ("  without the stop-byte read", ("stop",), False, "not stop[0], in alloc and in free"),
        ("  without relists[c] += 1", ("relists",), False, "counting local re-lists in shared memory"),
        ("  bare: none of the five", tuple(PIECES), False, "all five"),
        (
            "  a threading.Lock per call, not the inside byte",
            (),
            True,
            "acquire+release instead of the two byte stores",
        ),
    ]
    if a.show:
        for name, pieces, lock, _ in variants:
            fn = replica_source(pieces, lock).body[0]
            closures = [n for n in fn.body if isinstance(n, ast.FunctionDef)]
            print(f"# --- {name.strip()}\n" + "\n\n".join(ast.unparse(n) for n in closures) + "\n")
        return

    from shm import Arena, ProcessCache

    rows = []  # (name, run(n) -> (ns, calls timed), n)
    for name, pieces, lock, _ in variants:
        rows.append((name, clocked(pairs(*replica(pieces, lock))), a.n))

    arena = Arena.create(f"shmalloc-bench-{uuid.uuid4().hex[:8]}", 64 << 20, 8)
    caches = []
    try:
        ops = count_calls(arena, "run")  # locked operations (central or heap locks: all go through run), ns

        def cache_for():
            p = ProcessCache(arena)
            caches.append(p)
            return p

        pp, pl, pa, pr, ps, pf, pg = (cache_for() for _ in range(7))
        shipped = replica()
        faithful = same_code(shipped[0], pp.alloc) and same_code(shipped[1], pp.free)

        # The real pairs, 64 B and 1 MiB; count the refills the 64 B pairs meet after warm-up.
        pp.free(pp.alloc(64))
        pp.free(pp.alloc(1 << 20))
        refills_met = count_calls(pp, "_refill")
        pair_ops = {}

        def counting_ops(key, loop):
            def run(n):
                o = ops[0]
                t = time.perf_counter_ns()
                loop(n)
                t = time.perf_counter_ns() - t
                pair_ops[key] = pair_ops.get(key, 0) + ops[0] - o
                return t, n

            return run

        rows.append((PAIR, counting_ops("64", pairs(pp.alloc, pp.free)), a.n))
        rows.append((PAIR_1M, counting_ops("1M", sized_pairs(pp.alloc, pp.free, 1 << 20)), a.n))

        # Local frees: 64 at a time, from the span pl caches (its list never empties).
        pl.free(pl.alloc(64))

        def local_frees(n):
            alloc, free, t, batches = pl.alloc, pl.free, 0, max(1, n // 64)
            for _ in range(batches):
                blocks = [alloc(64) for _ in range(64)]
                t0 = time.perf_counter_ns()
                for b in blocks:
                    free(b)
                t += time.perf_counter_ns() - t0
            assert not pl._rfree_n[0], "a free of the local row took the remote path"
            return t, batches * 64

        apply_ns = []  # per remote-free row run: ns per free spent in the batch applies

        # Remote frees: pa allocates n blocks, pr frees them (a batch applied every 256).
        def remote_frees(n):
            alloc, free = pa.alloc, pr.free
            blocks = [alloc(64) for _ in range(n)]
            o, ot = ops
            t = time.perf_counter_ns()
            for b in blocks:
                free(b)
            t = time.perf_counter_ns() - t
            pair_ops["remote"] = pair_ops.get("remote", 0) + ops[0] - o
            apply_ns.append((ops[1] - ot) / n)
            return t, n

        rows.append((LOCAL, local_frees, a.n // 3))
        rows.append((REMOTE, remote_frees, a.n // 3))

        # view() and Block.buf of a live 64 B block: by its owner, and by another P.
        vb = pl.alloc(64)

        def views(fn):
            def run(n):
                t = time.perf_counter_ns()
                for _ in range(n):
                    fn()
                return time.perf_counter_ns() - t, n

            return run

        rows.append((VIEW, views(lambda: pl.view(vb.handle)), a.n))
        rows.append((VIEW_OTHER, views(lambda: pa.view(vb.handle, 64)), a.n))
        rows.append((BUF, views(lambda: vb.buf), a.n))

        # Shared mode: a second thread used ps once; every call then takes the P lock.
        th = threading.Thread(target=lambda: ps.free(ps.alloc(8)))
        th.start()
        th.join()
        assert ps.shared
        rows.append((SHARED, clocked(pairs(ps.alloc, ps.free)), a.n // 3))

        # Refill: pf empties its list, pg frees the 128 objects and applies them (they are now
        # PENDING in pf's span), then pf refills as its slow path would: the collect of that span.
        pf.free(pf.alloc(64))
        collected = []

        def refills(n):
            lst, alloc, free, t = pf._lists[C64], pf.alloc, pg.free, 0
            for _ in range(n):
                blocks = [alloc(64) for _ in range(len(lst))]
                for b in blocks:
                    free(b)
                pg.flush()
                with pf._lock:
                    pf._enter()
                    try:
                        t0 = time.perf_counter_ns()
                        h = pf._refill(C64)
                        t += time.perf_counter_ns() - t0
                        lst.append(h)  # LISTED, counted: back where the refill's pop took it
                        collected.append(len(lst))
                    finally:
                        pf._leave()
            return t, n

        nref = max(20, a.n // 1000)
        rows.append((REFILL, refills, nref))

        # Round robin: every repetition times every row; each row is its median.
        for _, run, n in rows:
            run(max(1, n // 10))
        refills_met[0] = 0
        pair_ops.clear()
        apply_ns.clear()
        times = {name: [] for name, _, _ in rows}
        for _ in range(a.reps):
            for name, run, n in rows:
                t, k = run(n)
                times[name].append(t / k)
        med = {name: sorted(ts)[a.reps // 2] for name, ts in times.items()}
        pairs_run = a.n * a.reps
    finally:
        try:
            for p in caches:
                p.close()
        finally:
            arena.destroy()

    def line(label, ns=None, base=None, note=""):
        v = "" if ns is None else f"{ns:.0f}"
        d = "" if base is None else f"{ns - base:+.0f}"
        print(f"{label:52s} {v:>7s} {d:>7s}   {note}".rstrip())

    ship, pair = med[variants[0][0]], med[PAIR]
    print(f"{'alloc(64)+free pair, the replica':52s} {'ns':>7s} {'diff':>7s}   the piece")
    print(
        f"  (compiled from shm/cache.py; bytecode identical to the real closures: {'yes' if faithful else 'NO'})"
    )
    line(variants[0][0], ship)
    for name, _, _, what in variants[1:]:
        line(name, med[name], ship, what)
    five = sum(med[v[0]] - ship for v in variants[1:6])
    print(f"{'  (the five differences added up)':52s} {'':7s} {five:+7.0f}   (against bare's)")

    print(f"\n{'the real thing, on an arena':52s} {'ns':>7s} {'diff':>7s}")
    line(PAIR, pair, ship, "vs the replica as shipped")
    line(PAIR_1M, med[PAIR_1M], pair, "vs the 64 B pair")
    line(LOCAL, med[LOCAL])
    line(REMOTE, med[REMOTE], med[LOCAL], "vs the local free")
    line("  of which its batch applies (locked operations)", sorted(apply_ns)[len(apply_ns) // 2])
    line(SHARED, med[SHARED], pair, "vs the owner thread")
    for row in (VIEW, VIEW_OTHER, BUF):
        line(row, med[row], note="target: at most 1 us (the loop and a lambda call included)")
    objs = sorted(collected)[len(collected) // 2]
    line(REFILL, med[REFILL], note=f"{objs} objects collected under the central lock")
    print(
        "\nA pair loop meets a refill: never in steady state (a local free re-lists the block, so the"
        f"\nlist never empties); the real 64 B pairs met {refills_met[0]} refills in {pairs_run} pairs."
        f"\nLocked operations (central or heap locks): {pair_ops.get('64', 0)} in those pairs,"
        f" {pair_ops.get('1M', 0)} in the 1 MiB pairs,"
        f"\n{pair_ops.get('remote', 0)} in the {a.n // 3 * a.reps} remote frees (one batch apply per {L.RFREE_CAP})."
    )


if __name__ == "__main__":
    main()
