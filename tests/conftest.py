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
import zlib

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
def one_thread():
    """Tiny models: one torch thread avoids OpenMP oversubscription on a 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interpreter_backend(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


# Fresh random inputs every run, reproducible on demand: each test seeds torch with the session
# seed + a stable hash of its id. Rerun a failure with TKD_TEST_SEED=<the seed in the header>.
SESSION_SEED = int(os.environ.get("TKD_TEST_SEED", int.from_bytes(os.urandom(4), "little") >> 1))


def pytest_report_header(config):
    return f"tkd: TKD_TEST_SEED={SESSION_SEED} (set it to reproduce this run's random inputs)"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    torch.manual_seed((SESSION_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31))
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus:  # shown even under -q: the seed that reproduces the failing inputs
        terminalreporter.write_line(f"tkd: rerun with TKD_TEST_SEED={SESSION_SEED}")
