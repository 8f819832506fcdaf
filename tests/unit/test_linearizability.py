"""The linearizability checker must accept linearizable histories and reject the others."""
from __future__ import annotations

import random

from afs.testing.linearizability import KVModel, Op, RegisterModel, check_history


def W(p, v, t0, t1, key="x", status="ok"):
    return Op(p, "write", key, v, None, t0, t1 if status == "ok" else None, status)


def R(p, v, t0, t1, key="x", status="ok"):
    return Op(p, "read", key, None, v, t0, t1 if status == "ok" else None, status)


def C(p, exp, new, out, t0, t1, key="x", status="ok"):
    return Op(p, "cas", key, (exp, new), out, t0, t1 if status == "ok" else None, status)


def test_empty_and_sequential_histories():
    assert check_history([], KVModel()).ok
    h = [W(1, 1, 0, 1), R(2, 1, 2, 3), C(1, 1, 2, True, 4, 5), R(2, 2, 6, 7), C(2, 1, 3, False, 8, 9)]
    assert check_history(h, RegisterModel()).ok


def test_read_of_initial_value():
    assert check_history([R(1, None, 0, 1)], RegisterModel()).ok
    assert not check_history([R(1, 5, 0, 1)], RegisterModel()).ok


def test_stale_read_after_completed_write_is_rejected():
    h = [W(1, 1, 0, 1), W(1, 2, 2, 3), R(2, 1, 4, 5)]
    r = check_history(h, RegisterModel())
    assert not r.ok
    assert "read" in r.explanation


def test_concurrent_write_allows_either_value():
    for seen in (1, 2):
        h = [W(1, 1, 0, 1), W(2, 2, 2, 10), R(3, seen, 3, 4)]
        assert check_history(h, RegisterModel()).ok


def test_reads_cannot_go_back_in_time():
    # The write is concurrent with both reads, but once read 2 sees the new value a later
    # read may not see the old one.
    h = [W(1, 1, 0, 1), W(2, 2, 2, 20), R(3, 2, 3, 4), R(4, 1, 5, 6)]
    assert not check_history(h, RegisterModel()).ok


def test_cas_results_are_checked():
    assert not check_history([W(1, 1, 0, 1), C(2, 1, 2, False, 2, 3)], RegisterModel()).ok
    assert not check_history([W(1, 1, 0, 1), C(2, 0, 2, True, 2, 3)], RegisterModel()).ok
    # Two successful CAS from the same expected value cannot both happen.
    h = [W(1, 0, 0, 1), C(2, 0, 1, True, 2, 5), C(3, 0, 2, True, 2, 5)]
    assert not check_history(h, RegisterModel()).ok
    h = [W(1, 0, 0, 1), C(2, 0, 1, True, 2, 5), C(3, 0, 2, False, 2, 5), R(1, 1, 6, 7)]
    assert check_history(h, RegisterModel()).ok


def test_indeterminate_write_may_or_may_not_take_effect():
    base = [W(1, 1, 0, 1), W(2, 2, 2, None, status="info")]
    assert check_history(base + [R(3, 1, 5, 6)], RegisterModel()).ok
    assert check_history(base + [R(3, 2, 5, 6)], RegisterModel()).ok
    # ... but it takes effect at most once and never before it was invoked.
    assert not check_history(base + [R(3, 2, 5, 6), R(3, 1, 7, 8)], RegisterModel()).ok
    h = [W(1, 1, 0, 1), R(3, 2, 2, 3), W(2, 2, 4, None, status="info")]
    assert not check_history(h, RegisterModel()).ok


def test_indeterminate_cas_output_is_not_checked():
    h = [W(1, 1, 0, 1), C(2, 1, 5, None, 2, None, status="info"), R(3, 5, 10, 11)]
    assert check_history(h, RegisterModel()).ok
    h = [W(1, 1, 0, 1), C(2, 3, 5, None, 2, None, status="info"), R(3, 5, 10, 11)]
    assert not check_history(h, RegisterModel()).ok


def test_failed_ops_never_happened():
    h = [W(1, 1, 0, 1), W(2, 2, 2, None, status="fail"), R(3, 2, 5, 6)]
    assert not check_history(h, RegisterModel()).ok


def test_keys_are_independent_and_bad_key_is_named():
    h = [W(1, 1, 0, 1, key="a"), W(1, 7, 0, 1, key="b"), R(2, 1, 2, 3, key="a"), R(2, 1, 2, 3, key="b")]
    r = check_history(h, KVModel())
    assert not r.ok and r.bad_key == "b"
    assert check_history(h[:3], KVModel()).ok


def test_lost_acknowledged_write_is_caught():
    # The classic Raft durability bug: an acknowledged write disappears after failover.
    h = [W(1, 1, 0, 1), W(2, 2, 2, 3), R(3, 1, 10, 11)]
    assert not check_history(h, KVModel()).ok


def _sequential_history(rng: random.Random, n: int) -> list[Op]:
    """A random history produced by a real register, with random overlap added by widening
    each op's interval around its true linearization point."""
    state = None
    ops = []
    for i in range(n):
        t = 10 * i + 5      # true linearization point
        p = rng.randrange(4)
        k = rng.random()
        if k < 0.4:
            v = rng.randrange(3)
            op = W(p, v, 0, 0)
            state = v
        elif k < 0.7:
            op = R(p, state, 0, 0)
        else:
            exp, new = rng.randrange(3), rng.randrange(3)
            out = state == exp
            if out:
                state = new
            op = C(p, exp, new, out, 0, 0)
        op.invoke = t - rng.randrange(0, 25)
        op.complete = t + rng.randrange(0, 25)
        if op.kind != "read" and rng.random() < 0.1:
            op.status, op.complete, op.output = "info", None, None
        ops.append(op)
    return ops


def test_randomized_linearizable_histories_pass_and_mutations_are_caught():
    rng = random.Random(7)
    caught = 0
    for _ in range(200):
        h = _sequential_history(rng, 30)
        assert check_history(h, RegisterModel()).ok
        # Corrupt one read that is far from any concurrent write: it must be rejected
        # whenever no linearization can explain the value.
        reads = [o for o in h if o.kind == "read" and o.status == "ok"]
        if reads:
            victim = rng.choice(reads)
            victim.output = 99      # never written
            assert not check_history(h, RegisterModel()).ok
            caught += 1
    assert caught > 100
