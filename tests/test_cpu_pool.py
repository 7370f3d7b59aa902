"""The CPU kernels' thread pool (csrc/cpu_pool.cpp): its back-off after a stalled helper.

`_C.pool_probe(n, threads, item_us, helper_delay_us)` runs n busy items of item_us on the pool;
the first item a helper thread takes sleeps helper_delay_us first, as a helper the OS has
descheduled would. It returns (items run by helpers, whether the pool now runs calls inline).
"""
import time

import pytest

_C = pytest.importorskip("tkd_core._C", reason="the C++ extension is not built")


def test_pool_runs_inline_for_a_while_after_a_helper_stalled_the_caller():
    # A helper that holds an item for 20 ms makes the caller wait (> 0.3 ms, > 8 items): the
    # pool backs off. On a busy machine a try can miss (no helper woke in time, or the caller
    # itself was descheduled until the helper was done), so tries repeat; 20 tries with a
    # helper at work and no back-off is a failure.
    _C.pool_reset_backoff()
    with_helper = 0
    for _ in range(200):
        by_helpers, backing_off = _C.pool_probe(256, 2, 20, 20_000)
        if backing_off:
            break
        with_helper += by_helpers > 0
        assert with_helper < 20, "helpers stalled the caller 20 times, the pool never backed off"
    else:
        pytest.skip("no helper thread ran an item in 200 tries (machine too busy)")
    t0 = time.monotonic()
    again = _C.pool_probe(256, 2, 20, 20_000)
    if time.monotonic() - t0 < 0.1:  # well inside the 0.2 s back-off: inline, no helper
        assert again == (0, True)
    time.sleep(0.3)
    assert _C.pool_probe(1, 2, 1, 0) == (0, False)  # the back-off is over
    _C.pool_reset_backoff()


def test_pool_one_thread_never_uses_helpers():
    _C.pool_reset_backoff()
    assert _C.pool_probe(64, 1, 5, 20_000) == (0, False)
