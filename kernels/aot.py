"""Ahead-of-time compilation of every Triton kernel for real GPUs, with no GPU present.

Each kernel module exposes `aot_specs() -> list[AotSpec]`: the kernels at the configurations its
dispatcher launches (derived from the same heuristics the launcher uses). This module compiles
them with `triton.compile(..., target=GPUTarget("cuda", cc, 32))` and reads their resource use
with `cuobjdump --dump-resource-usage` (shipped in the triton wheel): registers, spills (local
memory per thread), static + dynamic shared memory, and whether the PTX uses tensor cores.

Run it as `TRITON_INTERPRET=0 python -m tkd_core.kernels.aot [op ...]` (prints JSON), or call
`resource_usage(ops)`, which runs that in a subprocess: interpreted kernels cannot be compiled,
and a test session that imported tkd_core under TRITON_INTERPRET=1 only has interpreted ones.
"""
import dataclasses
import functools
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

OPS = ("layer_norm", "kd_loss", "attention")  # kernel modules that carry aot_specs()
TARGETS = (80, 90)  # compute capabilities: A100 (sm_80) and H100 (sm_90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (bytes)


@dataclasses.dataclass
class AotSpec:
    """One kernel launch configuration to compile ahead of time."""
    label: str              # human-readable, e.g. "layer_norm_fwd N=768 fp16"
    kernel: object          # the @triton.jit function
    signature: dict         # arg name -> Triton type ("*fp16", "i32", "fp32", "constexpr")
    constexprs: dict        # constexpr arg name -> value
    num_warps: int = 4
    num_stages: int = 3
    aligned: tuple = ()     # arg names known 16-divisible at launch (pointers, row strides)


def _bin(tool):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _parse_usage(text):
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cannot parse cuobjdump output:\n{text}")
    return {k: int(v) for k, v in zip(("regs", "stack", "static_shared", "local"), m.groups())}


def compile_spec(spec: AotSpec, cc: int) -> dict:
    """Compile one spec for sm_<cc>; return its resource use (raises on compile failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = spec.kernel.arg_names
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in spec.aligned}
    src = ASTSource(spec.kernel, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
    ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(ck.asm["cubin"])
        path = f.name
    try:
        out = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    usage = _parse_usage(out)
    ptx = ck.asm["ptx"]
    usage.update(
        label=spec.label, cc=cc, num_warps=spec.num_warps, num_stages=spec.num_stages,
        shared=usage["static_shared"] + ck.metadata.shared,
        spills=usage["local"],  # bytes of local memory per thread: >0 means spilled registers
        mma="mma.sync" in ptx or "wgmma" in ptx,
        wgmma="wgmma" in ptx,
        smem_limit=SMEM_LIMIT[cc],
    )
    return usage


def collect(ops=OPS):
    rows = []
    for op in ops:
        mod = importlib.import_module(f"tkd_core.kernels.{op}")
        for spec in mod.aot_specs():
            for cc in TARGETS:
                try:
                    rows.append(dict(op=op, ok=True, **compile_spec(spec, cc)))
                except Exception as e:  # report, never hide: the test asserts ok
                    rows.append(dict(op=op, ok=False, label=spec.label, cc=cc,
                                     error=f"{type(e).__name__}: {e}"[:2000]))
    return rows


@functools.lru_cache(maxsize=None)
def resource_usage(ops=OPS) -> list:
    """Compile `ops` in a fresh process with TRITON_INTERPRET=0; return the rows as dicts."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "tkd_core.kernels.aot", *ops],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile process failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    from .utils import interpreter_requested
    if interpreter_requested():
        sys.exit("run with TRITON_INTERPRET=0: interpreted kernels cannot be compiled")
    print(json.dumps(collect(tuple(sys.argv[1:]) or OPS)))
