"""Microbenchmarks: every kernel against its PyTorch reference (error and speed).

    python -m bench                     # every op
    python -m bench layer_norm kd_loss  # some ops

Each op has `bench/bench_<op>.py` with `cases(device, quick) -> list[Case]`; `harness.py` runs
them, prints one table per op and writes a CSV under bench/results/.
"""
