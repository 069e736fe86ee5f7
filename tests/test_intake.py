"""The refusal budgets, the tarpit and the table of remembered refusals (service/intake.py), on
a clock the test moves: what is sent at once, what is held and in which order, what is
dropped, what is counted.  The daemon's use of them is tested in test_security.py."""

import pytest

from service import intake as I
from service.intake import Intake


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(rate=0, burst=0, global_rate=0, global_burst=100, delay=0.25):
    clock = Clock()
    return Intake(rate, burst, global_rate, global_burst, delay, clock), clock


# (per-client rate, burst; global rate, burst; [(seconds later, identity)] -> admitted?)
BUDGETS = [
    ("a burst, then nothing", (0, 3, 0, 100), [(0, b"a")] * 5, [True, True, True, False, False]),
    ("the burst is per client", (0, 2, 0, 100), [(0, b"a"), (0, b"a"), (0, b"a"), (0, b"b")], [1, 1, 0, 1]),
    ("one more per 1/rate", (10, 1, 0, 100), [(0, b"a"), (0, b"a"), (0.1, b"a"), (0.05, b"a")], [1, 0, 1, 0]),
    (
        "refills up to the burst only",
        (10, 2, 0, 100),
        [(0, b"a")] * 2 + [(60, b"a"), (0, b"a"), (0, b"a")],
        [1, 1, 1, 1, 0],
    ),
    (
        "everyone's budget: fresh identities",
        (0, 5, 0, 3),
        [(0, bytes([i])) for i in range(5)],
        [1, 1, 1, 0, 0],
    ),
    (
        "a refusal held spends no token",
        (0, 1, 0, 2),
        [(0, b"a"), (0, b"a"), (0, b"b"), (0, b"c")],
        [1, 0, 1, 0],
    ),
    ("everyone's refills too", (0, 5, 1, 1), [(0, b"a"), (0, b"b"), (1, b"c")], [1, 0, 1]),
]


@pytest.mark.parametrize("budget, steps, admitted", [b[1:] for b in BUDGETS], ids=[b[0] for b in BUDGETS])
def test_budgets(budget, steps, admitted):
    it, clock = make(*budget)
    got = []
    for later, ident in steps:
        clock.t += later
        got.append(it.admit(ident))
    assert got == [bool(x) for x in admitted]
    assert it.counts()["refused"] == len(steps)


def test_held_replies_leave_in_order_after_the_delay():
    it, clock = make(delay=2.5)
    assert it.next_due is None and it.due() == []
    for i in range(3):  # held at 1000, 1001, 1002: due at 1002.5, 1003.5, 1004.5
        assert not it.admit(b"a")
        assert it.hold(b"a", [b"a"], b"reply %d" % i)
        clock.t += 1
    assert it.next_due == 1002.5
    assert it.due() == [([b"a"], b"reply 0")]
    assert it.due() == []
    clock.t += 2
    assert it.due() == [([b"a"], b"reply 1"), ([b"a"], b"reply 2")]
    assert it.next_due is None and it.due() == []
    assert it.counts() == {"refused": 3, "early": 0, "held": 3, "dropped": 0, "waiting": 0}


def test_flush_sends_every_held_reply_at_once():
    it, clock = make(delay=60)
    for ident in (b"a", b"b", b"a"):
        it.admit(ident)
        it.hold(ident, [ident], ident + b"!")
    assert it.due() == []
    assert it.flush() == [([b"a"], b"a!"), ([b"b"], b"b!"), ([b"a"], b"a!")]
    assert it.counts()["waiting"] == 0 and it.buckets[b"a"].held == 0


def test_held_replies_are_bounded_per_client_and_in_all(monkeypatch):
    monkeypatch.setattr(I, "MAX_HELD_PER_IDENTITY", 2)
    monkeypatch.setattr(I, "MAX_HELD", 3)
    it, clock = make()
    results = []
    for ident in (b"a", b"a", b"a", b"b", b"c"):
        it.admit(ident)
        results.append(it.hold(ident, [ident], b"r"))
    assert results == [True, True, False, True, False]
    assert it.counts() == {"refused": 5, "early": 0, "held": 3, "dropped": 2, "waiting": 3}
    clock.t += 1
    assert len(it.due()) == 3
    it.admit(b"a")
    assert it.hold(b"a", [b"a"], b"r"), "a client's bound counts what it has held now"


def test_budgets_of_many_identities_are_forgotten_but_not_those_holding(monkeypatch):
    monkeypatch.setattr(I, "MAX_IDENTITIES", 4)
    it, clock = make(burst=0)
    it.admit(b"holder")
    it.hold(b"holder", [b"holder"], b"r")
    for i in range(10):
        it.admit(bytes([i]))
    assert len(it.buckets) <= 4 and b"holder" in it.buckets
    assert it.flush() == [([b"holder"], b"r")]


def test_refusals_decided_by_the_frame_are_remembered_by_its_bytes(monkeypatch):
    monkeypatch.setattr(I, "MAX_REMEMBERED", 2)
    it, _ = make()
    assert it.early(b"junk") is None
    it.remember(b"junk", b"BAD_FRAME reply")
    assert it.early(b"junk") == b"BAD_FRAME reply"
    it.remember(b"x" * (I.MAX_REMEMBERED_FRAME + 1), b"too big to remember")
    assert it.early(b"x" * (I.MAX_REMEMBERED_FRAME + 1)) is None
    it.remember(b"other", b"r2")
    it.remember(b"third", b"r3")  # the table was full: emptied first
    assert it.early(b"junk") is None and it.early(b"third") == b"r3"
    it.malformed()
    assert it.counts() == {"refused": 1, "early": 3, "held": 0, "dropped": 0, "waiting": 0}


@pytest.mark.parametrize(
    "args",
    [(-1, 1, 1, 1, 0.1), (1, -1, 1, 1, 0.1), (1, 1, -1, 1, 0.1), (1, 1, 1, -1, 0.1), (1, 1, 1, 1, -0.1)],
)
def test_negative_budgets_are_refused(args):
    with pytest.raises(ValueError, match="refusal budget"):
        Intake(*args)


def test_every_refusal_code_is_one_a_client_earns():
    from client.protocol import CODES

    protocol_codes = set(CODES) - {"BAD_REPLY", "INTERNAL"}
    assert protocol_codes | {"FORBIDDEN", "NOT_REGISTERED"} == I.REFUSALS


def test_snapshot_budgets_are_per_client_and_refill(monkeypatch):
    from service.intake import Budgets

    monkeypatch.setattr(I, "MAX_IDENTITIES", 3)
    clock = Clock()
    b = Budgets(2, 2, clock)
    assert [b.admit(b"a") for _ in range(3)] == [True, True, False]
    assert b.admit(b"b")
    clock.t += 0.5  # one more token for a
    assert [b.admit(b"a"), b.admit(b"a")] == [True, False]
    for ident in (b"c", b"d"):  # the table is full: it starts afresh
        assert b.admit(ident)
    assert len(b.buckets) <= 3
    with pytest.raises(ValueError, match="snapshot budget"):
        Budgets(-1, 1)
