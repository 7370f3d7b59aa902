"""Triton kernels of tkd, installed as `tkd_core.kernels`.

One file per op: the math (forward and backward derivation), the `@triton.jit` kernels, the
launchers (`<op>_fwd`, `<op>_bwd`), the op's torch reference (`<op>_ref`), and its
`torch.library` registration. Shared heuristics live in `utils.py`; ahead-of-time GPU
compilation (registers, shared memory, spills without a GPU) lives in `aot.py`.
"""
