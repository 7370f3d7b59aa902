"""Every Triton kernel, at the configurations its dispatcher launches, compiled ahead of time for
sm_80 (A100) and sm_90 (H100) with no GPU present; resource use read with cuobjdump.

The compile runs once, in a subprocess with TRITON_INTERPRET=0 (this session's kernels are
interpreted ones): see tkd_core.kernels.aot.
"""
import pytest

from tkd_core.kernels import aot


@pytest.fixture(scope="module")
def usage():
    return aot.resource_usage(aot.OPS)


def _fmt(rows):
    return "\n".join(f"  sm_{r['cc']} {r['label']}: " + (r.get("error") or
                     f"regs={r['regs']} spills={r['spills']} smem={r['shared']}") for r in rows)


@pytest.mark.parametrize("op", aot.OPS)
def test_every_op_has_specs_for_both_targets(usage, op):
    rows = [r for r in usage if r["op"] == op]
    assert rows, f"{op}: aot_specs() lists no kernel configuration"
    assert {r["cc"] for r in rows} == set(aot.TARGETS)


@pytest.mark.parametrize("op", aot.OPS)
def test_compiles_without_spills_within_shared_memory(usage, op):
    rows = [r for r in usage if r["op"] == op]
    failed = [r for r in rows if not r["ok"]]
    assert not failed, f"{op}: compile failed:\n{_fmt(failed)}"
    spilled = [r for r in rows if r["spills"] or r["stack"]]
    assert not spilled, f"{op}: register spills (local memory):\n{_fmt(spilled)}"
    too_big = [r for r in rows if r["shared"] > r["smem_limit"]]
    assert not too_big, f"{op}: shared memory over the target's limit:\n{_fmt(too_big)}"
    assert all(0 < r["regs"] <= 255 for r in rows)


def test_attention_uses_tensor_cores_in_half_precision(usage):
    rows = [r for r in usage if r["op"] == "attention" and r["ok"]
            and ("fp16" in r["label"] or "bf16" in r["label"])]
    assert rows, "no fp16/bf16 attention configuration was compiled"
    no_mma = [r for r in rows if not r["mma"]]
    assert not no_mma, f"attention without mma.sync/wgmma in the PTX:\n{_fmt(no_mma)}"
