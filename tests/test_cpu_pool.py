"""The CPU kernels' thread pool (csrc/cpu_pool.cpp): its back-off after a stalled helper.

`_C.pool_probe(n, threads, item_us, helper_delay_us)` runs n busy items of item_us on the pool;
the first item a helper thread takes sleeps helper_delay_us first, as a helper the OS has
descheduled would. It returns (items run by helpers, whether the pool now runs calls inline).
"""
import time

import pytest

_C = pytest.importorskip("tkd_core._C", reason="the C++ extension is not built")


def test_pool_runs_inline_for_a_while_after_a_helper_stalled_the_caller():
    _C.pool_reset_backoff()
    for _ in range(100):  # a helper must take an item (it may not wake in time on a busy box)
        by_helpers, backing_off = _C.pool_probe(256, 2, 20, 20_000)
        if by_helpers:
            break
    else:
        pytest.skip("no helper thread ran an item in 100 tries (machine too busy)")
    assert backing_off  # the caller waited ~20 ms for the helper's item: > 0.3 ms, > 8 items
    assert _C.pool_probe(256, 2, 20, 20_000) == (0, True)  # now inline: no helper, no wait
    time.sleep(0.3)  # the back-off lasts 0.2 s
    assert _C.pool_probe(1, 2, 1, 0) == (0, False)
    _C.pool_reset_backoff()


def test_pool_one_thread_never_uses_helpers():
    _C.pool_reset_backoff()
    assert _C.pool_probe(64, 1, 5, 20_000) == (0, False)
