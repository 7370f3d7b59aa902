"""The one dispatch rule shared by every op, and the package layout it relies on."""
import os
import subprocess
import sys

import pytest
import torch

import tkd_core
from tkd_core.kernels import utils


def test_backend_rule_cpu(monkeypatch):
    x = torch.zeros(3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert tkd_core.ops.backend(x) == "interpreter"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert tkd_core.ops.backend(x) == "reference"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert tkd_core.ops.backend(x) == "reference"


def test_tkd_ops_reference_forces_the_torch_references(monkeypatch):
    class FakeCuda:
        is_cuda = True
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("TKD_OPS", "reference")
    assert tkd_core.ops.backend(torch.zeros(3)) == "reference"
    assert tkd_core.ops.backend(FakeCuda()) == "reference"
    monkeypatch.setenv("TKD_OPS", "triton")
    with pytest.raises(ValueError, match="TKD_OPS must be 'auto' or 'reference', got 'triton'"):
        tkd_core.ops.backend(torch.zeros(3))


def test_reference_ops_block_forces_the_references_and_nests(monkeypatch):
    class FakeCuda:
        is_cuda = True
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.zeros(3)
    with utils.reference_ops():
        assert tkd_core.ops.backend(x) == "reference"
        assert tkd_core.ops.backend(FakeCuda()) == "reference"
        with utils.reference_ops():
            assert tkd_core.ops.backend(x) == "reference"
        assert tkd_core.ops.backend(x) == "reference"  # still inside the outer block
    assert tkd_core.ops.backend(x) == "interpreter"
    with pytest.raises(RuntimeError):
        with utils.reference_ops():
            raise RuntimeError("left by an exception")
    assert tkd_core.ops.backend(x) == "interpreter"  # restored


def test_backend_rule_cuda_tensor_is_triton():
    class FakeCuda:  # no GPU here: only the device test of the rule is exercised
        is_cuda = True
    assert tkd_core.ops.backend(FakeCuda()) == "triton"


def test_kernels_live_under_tkd_core_not_top_level():
    assert tkd_core.kernels.__name__ == "tkd_core.kernels"
    # `kernels` is another PyPI project's name: tkd must not install a top-level package of it
    env = dict(os.environ)
    code = ("import importlib.util,sys; sys.path=[p for p in sys.path if p not in ('', '.')]; "
            "s=importlib.util.find_spec('kernels'); "
            "print('none' if s is None else (s.origin or str(s.submodule_search_locations)))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "none" or "tkd" not in out and "work/main" not in out, out


def test_interpreter_requested_after_import_fails_clearly():
    class Compiled:  # stands for a JITFunction compiled for the GPU
        pass
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        utils.ensure_launchable(Compiled(), "interpreter")
    utils.ensure_launchable(Compiled(), "triton")


def test_poisoned_buffers(monkeypatch):
    monkeypatch.setenv("TKD_POISON_OUTPUTS", "1")
    assert torch.isnan(utils.empty((4,), dtype=torch.float16, device="cpu")).all()
    assert (utils.empty((4,), dtype=torch.int32, device="cpu") == -2**31).all()


def test_check_tensor_messages_name_the_argument():
    with pytest.raises(TypeError, match="weight must have dtype"):
        utils.check_tensor("weight", torch.zeros(2, dtype=torch.int32), dtypes=utils.FLOAT_DTYPES)
    with pytest.raises(ValueError, match="logits must be 2-D"):
        utils.check_tensor("logits", torch.zeros(2), ndim=2)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        utils.check_tensor("x", [1, 2])
