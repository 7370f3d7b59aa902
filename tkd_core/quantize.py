"""`quantize_model`: swap a model's nn.Linear layers for dynamic INT8 `tkd_core.nn.Int8Linear`.

    report = tkd_core.quantize_model(model, skip=["classifier", "*.pooler.*"])
    print(report)   # what was converted, what was skipped and why

Inference only (Int8Linear has no gradient). Weights are quantized per output channel and packed
once here; activations are quantized per token at run time.
"""
import dataclasses
import fnmatch
from typing import Callable, Iterable, List, Tuple, Union

from torch import nn

from .nn import Int8Linear

Skip = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


@dataclasses.dataclass
class QuantizeReport:
    converted: List[Tuple[str, int, int]]  # (name, in_features, out_features)
    skipped: List[Tuple[str, str]]         # (name, reason)

    @property
    def params_converted(self) -> int:
        return sum(i * o for _, i, o in self.converted)

    def __str__(self):
        lines = [f"quantize_model: converted {len(self.converted)} nn.Linear layer(s) to "
                 f"Int8Linear ({self.params_converted:,} weights -> int8), skipped "
                 f"{len(self.skipped)}"]
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


def quantize_model(model: nn.Module, skip: Skip = None, verbose: bool = False) -> QuantizeReport:
    """Replace every nn.Linear in `model` (in place) by `Int8Linear.from_float(linear)`.

    skip: names to keep in float: a glob pattern, a list of patterns (matched against the dotted
    module name, e.g. "classifier" or "encoder.*.out"; a pattern naming a parent skips its
    children), or a callable (name, module) -> bool. Returns a QuantizeReport (printed when
    verbose). A bare nn.Linear passed as `model` cannot be replaced in place: use
    Int8Linear.from_float.
    """
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_model converts the nn.Linear layers inside a model in place; "
                        "for a single layer use tkd_core.nn.Int8Linear.from_float(linear)")
    skipped_by = _skip_fn(skip)
    report = QuantizeReport([], [])
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, nn.Linear) and name]
    for name, lin in targets:
        if skipped_by(name, lin):
            report.skipped.append((name, "matched skip"))
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear.from_float(lin))
        report.converted.append((name, lin.in_features, lin.out_features))
    if verbose:
        print(report)
    return report
