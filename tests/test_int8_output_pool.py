"""The CPU output pool (csrc/out_pool.h, `tkd_core.int8.cpu_output`): outputs of >= 8 MiB from
int8_gemm_packed, the dynamic int8 linear and Int8Linear come from pooled blocks that torch
hands back when the tensor's storage is freed.

What must hold: pooled outputs are exact (written whole: the suite poisons them first); a block
is never reused while any view of it lives; a freed one is reused by the next output of its
size; the cap, release and off switch do what they say; a lease ends on any thread and when the
capsule is never turned into a tensor.
"""
import gc
import threading

import pytest
import torch

from helpers import assert_close

from tkd_core import _C
from tkd_core import int8 as G
from tkd_core.nn import Int8Linear

# odd sizes whose float32 / int32 output is just above POOL_MIN_BYTES
M, N, K = 2049, 1031, 37
assert M * N * 4 >= G.POOL_MIN_BYTES


def rand_i8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def exact(a, b):
    return (a.double() @ b.double().T).long()  # exact: every partial sum is below 2^53


@pytest.fixture(autouse=True)
def pool_on():
    prev = G.set_output_pool(256 << 20)
    gc.collect()
    yield
    G.set_output_pool(prev)


def base_ptr(t):
    return t.untyped_storage().data_ptr()


def test_pooled_outputs_are_exact():
    a, b = rand_i8(M, K), rand_i8(N, K)
    w = G.pack_weight(b)
    sa, sb = torch.rand(M) * 0.1 + 1e-3, torch.rand(N) * 0.1 + 1e-3
    bias = torch.randn(N) * 50
    ref = exact(a, b)
    before = G.output_pool_stats()["leased_blocks"]
    y = G.int8_gemm_packed(a, w)
    assert G.output_pool_stats()["leased_blocks"] == before + 1  # it came from the pool
    assert base_ptr(y) % (2 << 20) == 0 and y.is_contiguous() and y.dtype == torch.int32
    assert torch.equal(y.long(), ref)
    del y
    ref_f = ref.double() * sa.double()[:, None] * sb.double()[None, :] + bias.double()
    y = G.int8_gemm_packed(a, w, sa, sb, bias, activation="gelu")
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert_close(y, G.activation_ref(ref_f, G.activation_code("gelu")), 2e-6, "pooled gelu")


def test_pooled_linear_matches_unpooled():
    """Int8Linear on a (B, S, K) input and quantized_linear_cpu: the same values from a pooled
    block as from torch's allocator (the same kernel; only where the output lives differs)."""
    lin = torch.nn.Linear(K, N)
    q = Int8Linear.from_float(lin, activation="gelu").eval()
    x = torch.randn(3, M // 3 + 1, K)
    with torch.no_grad():
        y_pool = q(x)
        G.set_output_pool(0)
        y_plain = q(x)
    assert y_pool.shape == y_plain.shape == (3, M // 3 + 1, N)
    assert torch.equal(y_pool, y_plain)
    G.set_output_pool(256 << 20)
    x2 = torch.randn(M, K)
    w = G.pack_weight(q.weight)
    y_pool = G.quantized_linear_cpu(x2, w, q.weight_scale, q.bias)
    G.set_output_pool(0)
    y_plain = G.quantized_linear_cpu(x2, w, q.weight_scale, q.bias)
    assert torch.equal(y_pool, y_plain)


def test_a_live_block_is_never_reused():
    a, b = rand_i8(M, K), rand_i8(N, K)
    w = G.pack_weight(b)
    y = G.int8_gemm_packed(a, w)
    first = base_ptr(y)
    view = y[5:, 3:]  # only a view of the output is kept
    kept = view.clone()
    del y
    a2 = rand_i8(M, K)
    y2 = G.int8_gemm_packed(a2, w)
    assert base_ptr(y2) != first
    assert torch.equal(view, kept)  # the live view was not written over
    assert torch.equal(y2.long(), exact(a2, b))
    del view, kept
    reuses = G.output_pool_stats()["reuses"]
    y3 = G.int8_gemm_packed(a, w)  # the first block is free again: reused
    assert base_ptr(y3) == first
    assert G.output_pool_stats()["reuses"] == reuses + 1


def test_off_cap_and_release():
    a, b = rand_i8(M, K), rand_i8(N, K)
    w = G.pack_weight(b)
    G.int8_gemm_packed(a, w)  # dropped at once: leaves one idle block
    assert G.output_pool_stats()["idle_bytes"] >= M * N * 4
    assert G.release_output_pool() >= M * N * 4
    assert G.output_pool_stats()["idle_bytes"] == 0
    # a cap below one block: a returned block is freed, not kept
    G.set_output_pool(1 << 20)
    G.int8_gemm_packed(a, w)
    s = G.output_pool_stats()
    assert s["idle_bytes"] == 0 and s["max_idle_bytes"] == 1 << 20
    # off: torch's allocator, the pool untouched
    assert G.set_output_pool(0) == 1 << 20
    allocs, leased = G.output_pool_stats()["allocs"], G.output_pool_stats()["leased_blocks"]
    y = G.int8_gemm_packed(a, w)
    assert G.output_pool_stats()["allocs"] == allocs
    assert G.output_pool_stats()["leased_blocks"] == leased
    assert torch.equal(y.long(), exact(a, b))
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_idle_bytes must be an int >= 0"):
            G.set_output_pool(bad)


def test_lease_ends_on_another_thread_and_for_an_unused_capsule():
    leased = G.output_pool_stats()["leased_blocks"]
    t = G.cpu_output((M, N), torch.float32)
    assert G.output_pool_stats()["leased_blocks"] == leased + 1
    box = [t]
    del t
    th = threading.Thread(target=box.clear)  # the last reference dies on another thread
    th.start()
    th.join()
    assert G.output_pool_stats()["leased_blocks"] == leased
    cap = _C.pooled_output(M, N, False)  # never given to torch.from_dlpack
    assert G.output_pool_stats()["leased_blocks"] == leased + 1
    del cap
    assert G.output_pool_stats()["leased_blocks"] == leased
    # small outputs stay with torch's allocator
    allocs = G.output_pool_stats()["allocs"] + G.output_pool_stats()["reuses"]
    small = G.cpu_output((7, 257), torch.float32)
    assert small.shape == (7, 257)
    assert G.output_pool_stats()["allocs"] + G.output_pool_stats()["reuses"] == allocs


def test_a_forked_child_uses_the_pool():
    """fork() (DataLoader workers) while the parent holds a lease: the child can take blocks, and
    its writes stay in its own copy. (A fork while another thread holds the pool's lock is
    handled by pthread_atfork in out_pool.cpp; that race is not reproducible in a test.)"""
    import os
    import sys
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    t = G.cpu_output((M, N), torch.float32)
    t.fill_(1.0)
    pid = os.fork()
    if pid == 0:  # the child: exit code 0 only if the pool works there
        try:
            torch.set_num_threads(1)  # libgomp's team does not survive fork (torch's fill_)
            leased = G.output_pool_stats()["leased_blocks"] >= 1
            u = G.cpu_output((M, N), torch.float32)
            u.fill_(2.0)
            code = 0 if leased and u.shape == (M, N) else 1
        except BaseException:
            code = 2
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert bool((t == 1.0).all())  # the child's writes went to its own copy


def test_a_nearby_size_reuses_a_block_a_distant_one_does_not():
    """Batches of varying length: a request that fits an idle block with at most a quarter of
    it unused takes that block; a much smaller one gets a new block. Results stay exact."""
    b = rand_i8(N, K)
    w = G.pack_weight(b)
    a = rand_i8(2 * M, K)
    y = G.int8_gemm_packed(a, w)  # (4098, 1031) int32: a 18 MiB block
    first = base_ptr(y)
    del y
    a2 = rand_i8(2 * M - 300, K)  # about 7% smaller: same block
    y2 = G.int8_gemm_packed(a2, w)
    assert base_ptr(y2) == first
    assert torch.equal(y2.long(), exact(a2, b))
    del y2
    a3 = rand_i8(M, K)  # half the size: a block of its own
    y3 = G.int8_gemm_packed(a3, w)
    assert base_ptr(y3) != first
    assert torch.equal(y3.long(), exact(a3, b))
