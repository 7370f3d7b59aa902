"""python -m bench [op ...] [--device cuda|cpu] [--quick]     every op against its peers
python -m bench gpu [--quick] [--dry-run] [...]             the GPU check (bench/gpu.py)"""
import argparse
import importlib
import os
import sys

OPS = ["layer_norm", "kd_loss", "attention", "int8_gemm", "train", "distill", "hf", "infer"]
ALIASES = {"layernorm": "layer_norm"}  # the op's name before kernels/layer_norm.py


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu"]:  # the GPU check command: its own flags (python -m bench gpu -h)
        from bench import gpu
        return gpu.main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("ops", nargs="*", help=f"ops to bench, among {OPS} (default: all)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    p.add_argument("--model", default=None, metavar="HF_FOLDER", help="infer: a fine-tuned "
                   "2-label BERT folder to run instead of all-MiniLM-L6-v2, scored on SST-2 dev")
    p.add_argument("--student", default=None, metavar="HF_FOLDER", help="infer: a fine-tuned "
                   "2-layer BERT folder instead of 2 layers picked from the model, scored too")
    args = p.parse_args(argv)
    ops = [ALIASES.get(o, o) for o in args.ops] or OPS
    unknown = [o for o in ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; valid: {OPS}")
    # On a machine without a GPU the Triton kernels are checked in the interpreter, which must
    # be chosen before tkd_core is imported (Triton decides at decoration time).
    import torch
    if not torch.cuda.is_available() or args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from bench.harness import default_device
    device = default_device(args.device)
    if (args.model or args.student) and "infer" not in ops:
        p.error("--model / --student are options of the infer bench")
    for flag, path in (("--model", args.model), ("--student", args.student)):
        if path and not os.path.isfile(os.path.join(path, "config.json")):
            p.error(f"{flag} {path}: not a Hugging Face model folder (no config.json)")
    for op in ops:
        extra = dict(model=args.model, student=args.student) if op == "infer" else {}
        importlib.import_module(f"bench.bench_{op}").main(device, quick=args.quick, **extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
