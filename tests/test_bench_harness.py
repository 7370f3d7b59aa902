"""bench.harness.interleaved: rounds, rotation, and turns of several calls whose first is not
timed (on a fake clock: what is checked is which calls count, not how long they take), and
the bench CLI's checks of its infer-only flags."""
import pytest
import torch

from bench import harness


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_turns_time_calls_after_the_lead(monkeypatch):
    clock, order = FakeClock(), []
    monkeypatch.setattr(harness.time, "perf_counter", clock)

    # a call costs its `cost` seconds, except the first call of a turn, which pays 100 s more
    # for what the previous provider left behind
    def provider(name, cost):
        def fn():
            first = not order or order[-1] != name
            order.append(name)
            clock.now += (100.0 if first else 0.0) + cost
        return fn

    fns = {"a": provider("a", 1.0), "b": provider("b", 2.0), "c": provider("c", 3.0)}
    # lead 4.5 s: a runs 1 untimed call (101 s: past the lead), b and c too
    med = harness.interleaved(fns, reps=4, device=torch.device("cpu"), warmup=1, block=2,
                              lead_s=4.5)
    assert med == {"a": 1.0, "b": 2.0, "c": 3.0}
    assert len(order) == 3 + 4 * 3 * 3
    turns = [order[i] for i in range(3, len(order), 3)]  # each round starts one provider later
    assert turns == list("abc" "bca" "cab" "abc")
    # block=1 and no lead: every call is timed, the turn's first-call cost included
    order.clear()
    med = harness.interleaved(fns, reps=3, device=torch.device("cpu"), warmup=0)
    assert med == {"a": 101.0, "b": 102.0, "c": 103.0}


def test_interleaved_lead_runs_for_its_seconds(monkeypatch):
    """Untimed calls repeat until lead_s has passed: 1 s calls, a 3.5 s lead -> 4 untimed."""
    clock, calls = FakeClock(), []
    monkeypatch.setattr(harness.time, "perf_counter", clock)

    def fn():
        calls.append(clock.now)
        clock.now += 1.0

    assert harness.interleaved({"x": fn}, reps=2, device=torch.device("cpu"), warmup=0,
                               block=3, lead_s=3.5) == {"x": 1.0}
    assert len(calls) == 2 * (4 + 3)


def test_bench_cli_refuses_infer_flags_where_they_do_not_apply(tmp_path, capsys):
    """--model / --student belong to the infer bench and must name an HF folder: refused with
    a message before any bench runs."""
    from bench.__main__ import main
    for argv, msg in ((["layer_norm", "--model", str(tmp_path)], "options of the infer bench"),
                      (["infer", "--model", str(tmp_path)], "not a Hugging Face model folder"),
                      (["infer", "--student", str(tmp_path / "nope")], "--student")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err
