"""python -m bench [op ...] [--device cuda|cpu] [--quick]"""
import argparse
import importlib
import os
import sys

OPS = ["layernorm", "kd_loss", "attention", "int8_gemm", "train"]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("ops", nargs="*", help=f"ops to bench, among {OPS} (default: all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    args = p.parse_args(argv)
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; valid: {OPS}")
    # On a machine without a GPU the Triton kernels are checked in the interpreter, which must
    # be chosen before tkd_core is imported (Triton decides at decoration time).
    import torch
    if not torch.cuda.is_available() or args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.harness import default_device
    device = default_device(args.device)
    for op in args.ops or OPS:
        try:
            mod = importlib.import_module(f"bench.bench_{op}")
        except ModuleNotFoundError as e:
            if e.name == f"bench.bench_{op}":
                print(f"(bench for {op} not available yet)")
                continue
            raise
        mod.main(device, quick=args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
