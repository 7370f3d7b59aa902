"""What is built on the INT8 op (tkd_core/int8/gemm.py): the drop-in `Int8Linear` and
`quantize_model`, which swaps a model's nn.Linear layers for it under a measured size rule.

    lin8 = Int8Linear.from_float(linear)                 # inference only
    report = quantize_model(model, skip=("classifier",))  # QuantizeReport: converted / kept, why
"""
import dataclasses
import fnmatch
from typing import Callable, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from .gemm import (_X_DTYPE_CODE, PackedInt8Weight, _ext, _int8_linear_op, _threads,
                   activation_code, cpu_output, int8_gemm, quantize_per_token,
                   quantize_per_token_ref)

# ---------------------------------------------------------------------------------------------
# Int8Linear: the drop-in module (inference only)
# ---------------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """Inference-only dynamic INT8 drop-in for nn.Linear (also `tkd_core.nn.Int8Linear`).

    Weights: int8 (out, in), quantized symmetrically per output channel (scale = absmax / 127)
    and, on CPU, packed once into the kernel's panel layout (the non-persistent buffer `packed`).
    Activations: quantized per token at run time (fused with packing on CPU), then
    y = act((q_x @ q_w.T) * s_x * s_w + bias) in the GEMM's fused epilogue, where act is the
    optional `activation` ("gelu", "gelu_tanh", "relu": a Linear followed by it, in one kernel).
    Buffers (state_dict): `weight` int8, `weight_scale` float32, `bias` float32 or None.
    forward(x (..., in)) -> (..., out) in x.dtype. No gradients. On CPU, torch.compile calls the
    registered op torch.ops.tkd.int8_linear; eager calls the kernel directly (no dispatcher).
    """

    def __init__(self, in_features, out_features, bias=True, device=None,
                 activation: Optional[str] = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.activation, self.act = activation, activation_code(activation)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8,
                                                   device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self._packed_key = None  # what the packed buffer and plan were made from (_cpu_plan)
        self._isa, self._plan = -1, None

    @classmethod
    def from_float(cls, linear: nn.Linear, activation: Optional[str] = None) -> "Int8Linear":
        """Quantize a float nn.Linear (per-channel symmetric int8 weights), packed once.
        activation: fuse the activation that follows the Linear into the epilogue."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None,
                device=w.device, activation=activation)
        q, scale = quantize_per_token_ref(w.float())  # per output channel = per row
        with torch.inference_mode(False), torch.no_grad():
            m.weight.copy_(q)
            m.weight_scale.copy_(scale)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach().float())
        if not w.is_cuda:
            m._cpu_plan()
        return m

    def __getstate__(self):
        """copy.deepcopy / pickle: the C++ plan holds raw pointers into this module's buffers,
        so a copy drops it and rebuilds its own on first use."""
        state = self.__dict__.copy()
        state.update(_plan=None, _packed_key=None)
        return state

    def _packed_weight(self) -> torch.Tensor:
        """The CPU packed weight, (re)packed when `weight` was loaded, moved or modified, or the
        ISA was forced (set_cpu_isa), since the last pack."""
        self._cpu_plan()
        return self.packed

    def _cpu_plan(self):
        """The kernel call bound to the packed weight, scales, bias and activation; rebuilt when
        any of them moved or changed (load_state_dict, .to(), in-place edits, set_cpu_isa)."""
        w, ws, b = self.weight, self.weight_scale, self.bias
        try:
            version = w._version
        except RuntimeError:  # an inference tensor has no version counter (nor in-place edits)
            version = -1
        key = (w.data_ptr(), version, _ext().cpu_isa_code(), ws.data_ptr(),
               b.data_ptr() if b is not None else 0)
        if key != self._packed_key:
            if ws.dtype != torch.float32 or not ws.is_contiguous():
                self.weight_scale = ws = ws.float().contiguous()
            if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
                self.bias = b = b.float().contiguous()
            packed = PackedInt8Weight(w)
            self.packed, self._isa = packed.data, packed.isa
            self._plan = _ext().LinearPlan(packed.data.data_ptr(), packed.isa, self.out_features,
                                           self.in_features, ws.data_ptr(),
                                           b.data_ptr() if b is not None else 0, self.act)
            self._packed_key = (w.data_ptr(), key[1], key[2], ws.data_ptr(), key[4])
        return self._plan

    def forward(self, x):
        if torch.compiler.is_compiling() and not x.is_cuda:
            # traced: the packed buffer as it stands (packed by from_float / load_state_dict /
            # the last eager call); the op's fake gives the shape
            return _int8_linear_op(x, self.packed, self._isa, self.weight_scale, self.bias,
                                   self.act).to(x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("Int8Linear is inference only: it has no gradient. Run it under "
                               "torch.no_grad() / torch.inference_mode(), or use nn.Linear to "
                               "train")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must end in in_features={self.in_features}, got shape "
                             f"{tuple(x.shape)}")
        if x.is_cuda or self.weight.is_cuda:
            return self._forward_cuda(x)
        code = _X_DTYPE_CODE.get(x.dtype)
        if code is None:
            raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
        plan = self._cpu_plan()
        x2 = x if x.is_contiguous() else x.reshape(-1, self.in_features).contiguous()
        M = x2.numel() // self.in_features if self.in_features else 0  # rows of (M, K)
        y = cpu_output((*x.shape[:-1], self.out_features), torch.float32)
        if M and self.out_features:
            plan(x2.data_ptr(), code, self.in_features, M, y.data_ptr(), _threads())
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _forward_cuda(self, x):
        if x.device != self.weight.device:
            raise ValueError(f"x is on {x.device} but Int8Linear's weight is on "
                             f"{self.weight.device}")
        q, s = quantize_per_token(x.reshape(-1, self.in_features))
        y = int8_gemm(q, self.weight, s, self.weight_scale, self.bias,
                      out_dtype=x.dtype if x.dtype in (torch.float16, torch.bfloat16)
                      else torch.float32, activation=self.activation)
        return y.view(*x.shape[:-1], self.out_features)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        if not self.weight.is_cuda:
            self._cpu_plan()  # torch.compile reads the packed buffer as it stands

    def extra_repr(self):
        act = f", activation={self.activation}" if self.act else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{act}, dynamic per-token int8 x per-channel int8")


# ---------------------------------------------------------------------------------------------
# quantize_model: swap a model's nn.Linear layers for Int8Linear
# ---------------------------------------------------------------------------------------------

# The size rule: a Linear with fewer weights than this stays float by default. Measured on this
# CPU (docs/int8_gemm_cpu.md, "When INT8 pays"; 1 thread, against nn.Linear): an Int8Linear call
# costs ~3 us more than nn.Linear's (quantizing the tokens, the scales, the packed panels), which
# the faster GEMM repays from ~16K weights at 16 tokens per call (64 x 256: 1.2x; 64 x 64: 0.7x)
# and from ~4K at 64 tokens. A Linear below the rule would make the model slower.
MIN_INT8_WEIGHTS = 16384

Skip = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def int8_pays(in_features: int, out_features: int, min_weights: int = MIN_INT8_WEIGHTS) -> bool:
    """The size rule of `quantize_model`: INT8 for a Linear of at least `min_weights` weights."""
    return in_features * out_features >= min_weights


@dataclasses.dataclass
class QuantizeReport:
    converted: List[Tuple[str, int, int]]  # (name, in_features, out_features)
    skipped: List[Tuple[str, str]]         # (name, reason)
    min_weights: int = MIN_INT8_WEIGHTS    # the size rule applied (0: none)

    @property
    def params_converted(self) -> int:
        return sum(i * o for _, i, o in self.converted)

    @property
    def too_small(self) -> List[str]:
        """Layers kept float by the size rule."""
        return [n for n, why in self.skipped if why.startswith("too small")]

    def __str__(self):
        lines = [f"quantize_model: converted {len(self.converted)} nn.Linear layer(s) to "
                 f"Int8Linear ({self.params_converted:,} weights -> int8), skipped "
                 f"{len(self.skipped)} (size rule: INT8 from {self.min_weights:,} weights)"]
        lines += [f"  int8  {n} ({i} -> {o})" for n, i, o in self.converted]
        lines += [f"  skip  {n}: {why}" for n, why in self.skipped]
        return "\n".join(lines)


def _skip_fn(skip: Skip) -> Callable[[str, nn.Module], bool]:
    if skip is None:
        return lambda name, mod: False
    if callable(skip):
        return skip
    patterns = [skip] if isinstance(skip, str) else list(skip)
    # a pattern matches the full dotted name, or any dotted prefix of it ("encoder.0")
    return lambda name, mod: any(
        fnmatch.fnmatchcase(name, p) or name.startswith(p + ".") for p in patterns)


def quantize_model(model: nn.Module, skip: Skip = None, verbose: bool = False,
                   min_weights: Optional[int] = None) -> QuantizeReport:
    """Replace the nn.Linear layers of `model` (in place) by `Int8Linear.from_float(linear)`.

    skip: names to keep in float: a glob pattern, a list of patterns (matched against the dotted
    module name, e.g. "classifier" or "encoder.*.out"; a pattern naming a parent skips its
    children), or a callable (name, module) -> bool. min_weights: the size rule, a Linear with
    fewer weights (in_features * out_features) stays float because INT8 would make it slower
    (default MIN_INT8_WEIGHTS, measured; 0 converts every layer not skipped). Returns a
    QuantizeReport (printed when verbose) naming every layer converted or kept and why. A bare
    nn.Linear passed as `model` cannot be replaced in place: use Int8Linear.from_float.
    """
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_model converts the nn.Linear layers inside a model in place; "
                        "for a single layer use tkd_core.nn.Int8Linear.from_float(linear)")
    min_weights = MIN_INT8_WEIGHTS if min_weights is None else int(min_weights)
    if min_weights < 0:
        raise ValueError(f"min_weights must be >= 0, got {min_weights}")
    skipped_by = _skip_fn(skip)
    report = QuantizeReport([], [], min_weights)
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and name]
    for name, lin in targets:
        if skipped_by(name, lin):
            report.skipped.append((name, "matched skip"))
            continue
        if not int8_pays(lin.in_features, lin.out_features, min_weights):
            report.skipped.append((name, f"too small for INT8 to pay: {lin.in_features} x "
                                         f"{lin.out_features} = "
                                         f"{lin.in_features * lin.out_features:,} weights < "
                                         f"min_weights {min_weights:,}"))
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_float(lin))
        report.converted.append((name, lin.in_features, lin.out_features))
    if verbose:
        print(report)
    return report
