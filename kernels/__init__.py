"""Triton kernels of tkd, installed as `tkd_core.kernels`.

One file per op, named after it (`layer_norm.py`, `kd_loss.py`, `attention.py`), each in one
section order: the math (forward and backward derivation) in the docstring, the `@triton.jit`
kernels, the launchers (`config(...) -> Config`, the op's one launch heuristic, a frozen
dataclass; then `<op>_fwd`, `<op>_bwd`), the `torch.library` registration, the public op, its
torch reference (`<op>_ref`), and the list of configurations compiled ahead of time
(`aot_specs`). Shared helpers live in `utils.py`; ahead-of-time GPU compilation (registers,
shared memory, spills without a GPU) lives in `aot.py`.
"""
