"""ModelConfig: one commented dataclass for every architecture, and the named presets.

    cfg = ModelConfig.preset("cpu-teacher", vocab_size=tok.get_vocab_size(), num_labels=2)
    cfg = ModelConfig.from_dict(ck["config"])     # old checkpoints' dicts included
    d = cfg.to_dict()

It lives apart from the models so that the Transformer, the baselines and the HF converter all
import it without importing each other. Fields are grouped by who reads them; a field outside a
model's group is ignored by that model.
"""
import dataclasses

GELUS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")  # hidden_act values (HF's names)
POOLER_ACTIVATIONS = ("tanh", "relu")


@dataclasses.dataclass
class ModelConfig:
    # -- every architecture
    arch: str = "transformer"          # key of tkd_core.models.ARCHS
    vocab_size: int = 30522            # WordPiece vocabulary (set from the tokenizer)
    hidden_size: int = 768             # Transformer width; baselines: embedding width E
    num_layers: int = 12               # encoder layers; recurrent baselines: stacked layers
    type_vocab_size: int = 2           # token types: sentence A / sentence B; 0 = no token-type
                                       # embedding at all (DistilBERT)
    max_positions: int = 512           # rows of the position table (the longest input is
                                       # max_positions - position_offset)
    hidden_dropout: float = 0.1        # embeddings, sublayer outputs, classifier input
    num_labels: int = 2                # classes; 1 = regression (STS-B)
    initializer_range: float = 0.02    # std of the normal init (BERT)
    # -- Transformer
    num_heads: int = 12
    ffn_size: int = 3072               # inner size of the feed-forward block
    attention_dropout: float = 0.1     # on the attention probabilities
    layer_norm_eps: float = 1e-12      # BERT's epsilon (RoBERTa: 1e-5)
    pre_ln: bool = False               # False: post-LN (BERT); True: pre-LN
    pooling: str = "cls"               # cls: BERT's [CLS] token; mean: masked mean of the tokens
    positions: str = "learned"         # learned (BERT) or sinusoidal (fixed; every position is
                                       # defined even where training data is short)
    # -- Transformer: the differences between the BERT-family checkpoints tkd.hf loads
    hidden_act: str = "gelu"           # FFN activation, HF's names: gelu = exact erf form (BERT,
                                       # MiniLM); gelu_new / gelu_pytorch_tanh = the tanh
                                       # approximation (some TinyBERTs); relu
    position_offset: int = 0           # position of the first token: RoBERTa numbers positions
                                       # from padding_idx + 1 = 2 (fairseq), rows 0-1 unused
    pad_token_id: int = 0              # the word table's padding row (no gradient): [PAD] = 0
                                       # in BERT vocabularies, <pad> = 1 in RoBERTa's
    pooler_activation: str = "tanh"    # the head: dense + activation on the first token, then
                                       # the classifier. tanh: BERT's pooler and RoBERTa's
                                       # classifier.dense; relu: DistilBERT's pre_classifier
    pooler_dropout: bool = False       # dropout before the head's dense too (RoBERTa's head
                                       # drops out <s> before classifier.dense; BERT does not)
    classifier_dropout: float = -1.0   # dropout on the classifier input; < 0: hidden_dropout
                                       # (HF: classifier_dropout, DistilBERT seq_classif_dropout)
    # -- baselines (tkd_core.models.baselines)
    rnn_size: int = 128                # rnn / lstm / bilstm: recurrent state width per direction
    cnn_maps: int = 100                # cnn: feature maps per filter width (Kim 2014: 100)

    @property
    def regression(self) -> bool:
        return self.num_labels == 1

    @property
    def head_dropout(self) -> float:
        return self.classifier_dropout if self.classifier_dropout >= 0 else self.hidden_dropout

    def __post_init__(self):
        if self.arch == "transformer" and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads "
                             f"({self.num_heads})")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 = regression), got {self.num_labels}")
        for name, valid in (("positions", ("learned", "sinusoidal")), ("pooling", ("cls", "mean")),
                            ("hidden_act", GELUS), ("pooler_activation", POOLER_ACTIVATIONS)):
            if getattr(self, name) not in valid:
                raise ValueError(f"{name} must be one of {valid}, got {getattr(self, name)!r}")
        if not 0 <= self.position_offset < self.max_positions:
            raise ValueError(f"position_offset must be in [0, max_positions={self.max_positions}), "
                             f"got {self.position_offset}")
        if self.type_vocab_size < 0:
            raise ValueError(f"type_vocab_size must be >= 0 (0 = no token types), got "
                             f"{self.type_vocab_size}")

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A config from `to_dict()`'s output, including the dicts of checkpoints written before
        the baselines had their own fields (see LEGACY_KEYS)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        d = dict(d)
        new, old = LEGACY_KEYS.get(d.get("arch", "transformer"), (None, None))
        if new is not None and new not in d and old in d:
            d[new] = d[old]
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Checkpoints written before rnn_size / cnn_maps existed kept the baselines' widths in ffn_size:
# arch -> (today's field, the field the old dict holds it in).
LEGACY_KEYS = {"rnn": ("rnn_size", "ffn_size"), "lstm": ("rnn_size", "ffn_size"),
               "bilstm": ("rnn_size", "ffn_size"), "cnn": ("cnn_maps", "ffn_size")}

_BASELINE = dict(hidden_size=128, max_positions=128, hidden_dropout=0.1, num_layers=1)
PRESETS = {
    # the paper's teacher
    "bert-base": dict(hidden_size=768, num_layers=12, num_heads=12, ffn_size=3072),
    # CPU-sized (the default run). The 12-layer teacher is pre-LN: measured on the built-in
    # task, post-LN (and hidden 128) 12-layer models stay at chance for the 2+ epochs a CPU run
    # affords, while pre-LN hidden 64 reaches ~95% dev accuracy in 4 epochs (lr 2e-3).
    "cpu-teacher": dict(hidden_size=64, num_layers=12, num_heads=4, ffn_size=256,
                        max_positions=128, pre_ln=True),
    "cpu-student-4": dict(hidden_size=128, num_layers=4, num_heads=4, ffn_size=512,
                          max_positions=128),
    "cpu-student-2": dict(hidden_size=64, num_layers=2, num_heads=4, ffn_size=256,
                          max_positions=128),
    # baselines (tkd_core.models.baselines): E = hidden_size, H = rnn_size / cnn_maps
    "cpu-bilstm": dict(_BASELINE, arch="bilstm", rnn_size=128),
    "cpu-rnn": dict(_BASELINE, arch="rnn", rnn_size=128),
    "cpu-lstm": dict(_BASELINE, arch="lstm", rnn_size=128),
    "cpu-cnn": dict(_BASELINE, arch="cnn", cnn_maps=100, hidden_dropout=0.5),
    # tests
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, ffn_size=64, max_positions=64),
    "tiny-bilstm": dict(_BASELINE, arch="bilstm", hidden_size=16, rnn_size=16),
    "tiny-rnn": dict(_BASELINE, arch="rnn", hidden_size=16, rnn_size=16),
    "tiny-lstm": dict(_BASELINE, arch="lstm", hidden_size=16, rnn_size=16),
    "tiny-cnn": dict(_BASELINE, arch="cnn", hidden_size=16, cnn_maps=8),
}
