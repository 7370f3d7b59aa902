"""Non-Transformer students and baselines: BiLSTM (KD-NLP), RNN, LSTM and CNN (Kim 2014).

    cfg = ModelConfig.preset("cpu-bilstm", vocab_size=tok.get_vocab_size(), num_labels=2)
    model = build_model(cfg)                                    # ARCHS["bilstm"]
    logits = model(input_ids, attention_mask, token_type_ids)   # (B, num_labels)

`tkd_core.models` registers the four in its ARCHS; their CPU-sized presets (`cpu-bilstm`, ...)
are in `tkd_core.models.config.PRESETS`, so `python -m tkd_core.train --preset cpu-bilstm` trains
one.

They share the Transformer's forward signature and its `ModelConfig`; the fields they read:

    vocab_size, type_vocab_size   word / token-type embeddings (the sum is the input vector)
    hidden_size                   E: embedding width
    rnn_size                      H: recurrent state width per direction (RNN, LSTM, BiLSTM)
    cnn_maps                      H: feature maps per filter width (CNN)
    num_layers                    stacked recurrent layers (CNN: must be 1, one conv layer)
    hidden_dropout                on the embeddings and on the classifier input
    num_labels, initializer_range
    max_positions                 longest input accepted (the trainer checks --max-len with it)

Sequence readers (B, S) -> (B, feature):
    rnn     Elman RNN (tanh), the state after the last real token         feature = H
    lstm    LSTM, the state after the last real token                     feature = H
    bilstm  Tang et al. 2019 ("Distilling Task-Specific Knowledge from BERT into Simple Neural
            Networks"): one BiLSTM layer, the forward state after the last real token
            concatenated with the backward state at the first token, then a ReLU layer
                                                                          feature = 2H -> H
    cnn     Kim 2014: filter widths 3, 4, 5 with H maps each, ReLU, max over time of the windows
            that lie inside the sentence                                   feature = 3H
then dropout and a linear classifier. Padding never changes the output: recurrent readers run on
packed sequences of the true lengths, the CNN masks windows that reach past the sentence.
"""
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from .config import ModelConfig

KIM_WIDTHS = (3, 4, 5)  # CNN filter widths (Kim 2014)


def lengths_of(input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    """(B,) int64 CPU lengths: the count of real tokens (at least 1, so every row is read)."""
    if attention_mask is None:
        return torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long)
    return attention_mask.long().sum(1).clamp_min(1).cpu()


def _check_inputs(input_ids, attention_mask, token_type_ids):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
            input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError("input_ids must be a 2-D (B, S) integer tensor, got "
                         f"{getattr(input_ids, 'shape', type(input_ids).__name__)} "
                         f"{getattr(input_ids, 'dtype', '')}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have at least one row and one token, got shape "
                         f"{tuple(input_ids.shape)}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(t.shape)}")


class SequenceClassifier(nn.Module):
    """Embeddings -> a sequence reader (subclass: `features`) -> dropout -> linear classifier."""

    def __init__(self, cfg: ModelConfig, feature_size: int):
        super().__init__()
        self.config = cfg
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.drop = nn.Dropout(cfg.hidden_dropout)
        self.classifier = nn.Linear(feature_size, cfg.num_labels)

    def _init(self):
        std = self.config.initializer_range
        for m in (self.word, self.token_type):
            nn.init.normal_(m.weight, std=std)
        with torch.no_grad():
            self.word.weight[0].zero_()  # [PAD]
        nn.init.normal_(self.classifier.weight, std=std)
        nn.init.zeros_(self.classifier.bias)

    def embed(self, input_ids, attention_mask, token_type_ids):
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word(input_ids) + self.token_type(token_type_ids)  # (B, S, E)
        if attention_mask is not None:  # padding positions carry exact zeros
            x = x * attention_mask.unsqueeze(-1).to(x.dtype)
        return self.drop(x)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        _check_inputs(input_ids, attention_mask, token_type_ids)
        x = self.embed(input_ids, attention_mask, token_type_ids)
        feats = self.features(x, lengths_of(input_ids, attention_mask))  # (B, F)
        return self.classifier(self.drop(feats))  # (B, num_labels)


class RecurrentClassifier(SequenceClassifier):
    """RNN / LSTM / BiLSTM reader on packed sequences (padding is never read)."""

    cell = "lstm"
    bidirectional = False

    def __init__(self, cfg: ModelConfig):
        H = cfg.rnn_size
        head = H if self.bidirectional else 0  # Tang et al.: a ReLU layer over [fwd; bwd]
        super().__init__(cfg, head or H)
        rnn = nn.LSTM if self.cell == "lstm" else nn.RNN
        kw = {} if self.cell == "lstm" else {"nonlinearity": "tanh"}
        self.rnn = rnn(cfg.hidden_size, H, num_layers=cfg.num_layers, batch_first=True,
                       bidirectional=self.bidirectional,
                       dropout=cfg.hidden_dropout if cfg.num_layers > 1 else 0.0, **kw)
        self.head = nn.Sequential(nn.Linear(2 * H, H), nn.ReLU()) if head else None
        self._init()

    def features(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        _, state = self.rnn(packed)
        h = state[0] if isinstance(state, tuple) else state  # (layers * dirs, B, H)
        if not self.bidirectional:
            return h[-1]  # (B, H): last layer after the last real token
        feats = torch.cat([h[-2], h[-1]], dim=-1)  # (B, 2H): forward end, backward end
        return self.head(feats)  # (B, H)


class RNNClassifier(RecurrentClassifier):
    cell = "rnn"


class LSTMClassifier(RecurrentClassifier):
    cell = "lstm"


class BiLSTMClassifier(RecurrentClassifier):
    cell = "lstm"
    bidirectional = True


class CNNClassifier(SequenceClassifier):
    """Kim 2014: parallel 1-D convolutions of widths 3/4/5, ReLU, max-over-time pooling."""

    def __init__(self, cfg: ModelConfig):
        if cfg.num_layers != 1:
            raise ValueError(f"cnn has one convolution layer: num_layers must be 1, got "
                             f"{cfg.num_layers}")
        super().__init__(cfg, cfg.cnn_maps * len(KIM_WIDTHS))
        self.convs = nn.ModuleList(nn.Conv1d(cfg.hidden_size, cfg.cnn_maps, w)
                                   for w in KIM_WIDTHS)
        self._init()
        for conv in self.convs:
            # zero biases: PyTorch's default (uniform +-1/sqrt(E * w), ~0.14 at E=16) swamps the
            # 0.02-std embeddings' products, so a map with a negative bias was below zero at every
            # window of every sentence: ReLU + max-pooling gave it no gradient, dead for good
            nn.init.zeros_(conv.bias)

    def features(self, x, lengths):
        S = x.shape[1]
        if S < max(KIM_WIDTHS):  # every width needs one full window
            x = nn.functional.pad(x, (0, 0, 0, max(KIM_WIDTHS) - S))
        x = x.transpose(1, 2)  # (B, E, S')
        lengths = lengths.to(x.device)
        out = []
        for w, conv in zip(KIM_WIDTHS, self.convs):
            c = torch.relu(conv(x))  # (B, H, S' - w + 1)
            # windows inside the sentence: start < len - w + 1 (a sentence shorter than w keeps
            # its first window, whose tail is zero padding whatever the batch's padding)
            n_valid = (lengths - w + 1).clamp_min(1)  # (B,)
            pos = torch.arange(c.shape[-1], device=x.device)
            c = c.masked_fill(pos[None, None, :] >= n_valid[:, None, None], float("-inf"))
            out.append(c.amax(-1))  # (B, H)
        return torch.cat(out, dim=-1)  # (B, 3H)


BASELINES = {"bilstm": BiLSTMClassifier, "rnn": RNNClassifier, "lstm": LSTMClassifier,
             "cnn": CNNClassifier}
