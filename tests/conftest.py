"""Test session set-up.

Devices. `pytest --device cpu` (the default) or `pytest --device cuda`: the op test files take a
`device` fixture and build their tensors on it, so the same files check the Triton kernels in
Triton's interpreter and on a GPU (compiled), against the same float64 references. Under
`--device cuda` the tests that do not take `device` (CPU-only checks: the interpreter and
reference paths, AOT compiles, the trainer, ...) are skipped; on a machine without CUDA,
`--device cuda` is a usage error.

Paths. On CPU, TRITON_INTERPRET=1 is set before tkd_core is imported (pytest_configure, before
collection), so every Triton kernel is an interpreted one and CPU tensors run the kernels in
Triton's interpreter (the dispatch rule). Tests that want the torch reference path on CPU use
the `reference_backend` fixture, which unsets it for the test's duration; tests that take the
`path` fixture run once per path of the device: "interpreter" and "reference" on CPU, "triton"
on CUDA. AOT GPU compilation runs in a subprocess with TRITON_INTERPRET=0
(`tkd_core.kernels.aot.resource_usage`). TKD_POISON_OUTPUTS=1 makes every launcher NaN-fill
the buffers it allocates before a kernel writes them (`tkd_core.kernels.utils.empty`).
"""
import os
import sys
import zlib

sys.path.insert(0, os.path.dirname(__file__))  # tests/helpers.py

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICES = ("cpu", "cuda")


def pytest_addoption(parser):
    parser.addoption("--device", choices=DEVICES, default="cpu",
                     help="device of the op tests' tensors: cpu (Triton interpreter and torch "
                          "references) or cuda (compiled Triton kernels, the CUDA INT8 kernel)")


def pytest_configure(config):
    device = config.getoption("--device")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device cuda: no CUDA device here (torch {torch.__version__}, "
                                f"CUDA {torch.version.cuda or 'none'}); run without it")
    # decided before tkd_core is imported: Triton picks compiled or interpreted at decoration
    os.environ["TRITON_INTERPRET"] = "1" if device == "cpu" else "0"
    os.environ["TKD_POISON_OUTPUTS"] = "1"  # launchers NaN-fill outputs before kernels run


def pytest_collection_modifyitems(config, items):
    if config.getoption("--device") == "cpu":
        return
    skip = pytest.mark.skip(reason="CPU-only test (it takes no `device`): run without --device")
    for item in items:
        if "device" not in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "path" in metafunc.fixturenames:
        cuda = metafunc.config.getoption("--device") == "cuda"
        metafunc.parametrize("path", ["triton"] if cuda else ["interpreter", "reference"],
                             indirect=True)


@pytest.fixture
def device(request):
    """The device of the op tests' tensors (--device, default cpu)."""
    return torch.device(request.config.getoption("--device"))


@pytest.fixture
def path(request, device, monkeypatch):
    """The op path under test: "interpreter" and "reference" on CPU (TRITON_INTERPRET=1 / 0),
    "triton" on CUDA (compiled kernels)."""
    import tkd_core
    if request.param != "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1" if request.param == "interpreter" else "0")
    assert tkd_core.ops.backend(torch.zeros(1, device=device)) == request.param
    return request.param


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
