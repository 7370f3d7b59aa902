"""Test session set-up.

TRITON_INTERPRET=1 is set before tkd_core is imported, so every Triton kernel is an interpreted
one and CPU tensors run the kernels in Triton's interpreter (the dispatch rule). Tests that want
the torch reference path on CPU use the `reference_backend` fixture, which unsets it for the
test's duration. AOT GPU compilation runs in a subprocess with TRITON_INTERPRET=0
(`tkd_core.kernels.aot.resource_usage`). TKD_POISON_OUTPUTS=1 makes every launcher NaN-fill
the buffers it allocates before a kernel writes them (`tkd_core.kernels.utils.empty`).
"""
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
os.environ["TKD_POISON_OUTPUTS"] = "1"  # launchers NaN-fill outputs before kernels run
sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

import pytest  # noqa: E402
import torch  # noqa: E402

SST2_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue", "SST-2")


@pytest.fixture
def reference_backend(monkeypatch):
    """Run ops on their torch reference path (the fast CPU path) for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    yield


@pytest.fixture
def interpreter_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # fresh random inputs per test, but reproducible from the test id when a failure is rerun
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2**31))
    yield
