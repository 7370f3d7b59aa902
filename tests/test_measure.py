"""tkd_core.measure's latency in rounds: every model timed in every round, in turn, with the
requested forwards per batch; bad round counts refused."""
import pytest
import torch

from tkd_core import measure
from tkd_core.models import ModelConfig, build_model


class Counting(torch.nn.Module):
    """A model that records the batch sizes it is called with, in order."""

    def __init__(self, name, log):
        super().__init__()
        self.config = ModelConfig.preset("tiny", vocab_size=50, num_labels=2)
        self.name, self.log = name, log

    def forward(self, ids, mask=None, types=None):
        self.log.append((self.name, ids.shape[0]))
        return torch.zeros(ids.shape[0], 2)


def test_latency_rounds_interleaves_models_and_counts_forwards():
    log = []
    models = {"a": Counting("a", log), "b": Counting("b", log)}
    out = measure.latency_rounds(models, (1, 32), {1: 4, 32: 2}, rounds=3)
    assert set(out) == {"a", "b"}
    assert all(len(out[m][b]) == 3 and all(t >= 0 for t in out[m][b])
               for m in out for b in (1, 32))
    per_turn = (2 + 4) + (2 + 2)  # warm-ups + timed forwards at batch 1, then at batch 32
    assert len(log) == 3 * 2 * per_turn
    turns = [log[i][0] for i in range(0, len(log), per_turn)]
    assert turns == ["a", "b"] * 3  # each round: every model in turn
    assert [b for _, b in log[:per_turn]] == [1] * 6 + [32] * 4


def test_latency_rounds_on_a_real_model_and_bad_rounds():
    torch.manual_seed(0)
    m = build_model(ModelConfig.preset("tiny", vocab_size=50, num_labels=2)).eval()
    out = measure.latency_rounds({"m": m}, (1,), 2, rounds=1)
    assert len(out["m"][1]) == 1 and out["m"][1][0] > 0
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        measure.latency_rounds({"m": m}, (1,), 2, rounds=0)
