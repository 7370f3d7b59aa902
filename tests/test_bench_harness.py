"""bench.harness.interleaved: rounds, rotation, and turns of several calls whose first is not
timed (on a fake clock: what is checked is which calls count, not how long they take)."""
import torch

from bench import harness


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_blocks_drop_each_turns_first_call(monkeypatch):
    clock, order, slept = FakeClock(), [], []
    monkeypatch.setattr(harness.time, "perf_counter", clock)
    monkeypatch.setattr(harness.time, "sleep", slept.append)
    # a call costs 1 s, except the first call of a turn, which pays 100 s for what the
    # previous provider left behind
    def provider(name, cost):
        def fn():
            first = not order or order[-1] != name
            order.append(name)
            clock.now += (100.0 if first else 0.0) + cost
        return fn
    fns = {"a": provider("a", 1.0), "b": provider("b", 2.0), "c": provider("c", 3.0)}
    med = harness.interleaved(fns, reps=4, device=torch.device("cpu"), warmup=1, block=3,
                              settle_s=0.02)
    assert med == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert len(order) == 3 + 4 * 3 * 3 and slept == [0.02] * 12
    turns = [order[i] for i in range(3, len(order), 3)]  # each round starts one provider later
    assert turns == list("abc" "bca" "cab" "abc")
    # block=1: every call is timed, the turn's cost included
    order.clear()
    med = harness.interleaved(fns, reps=3, device=torch.device("cpu"), warmup=0)
    assert med == {"a": 101.0, "b": 102.0, "c": 103.0}
