// A small thread pool for the CPU kernels that never waits for a thread the OS has not run.
//
// parallel_for(n, threads, fn) runs fn(i) for every i in [0, n) on the calling thread and up to
// threads - 1 helpers. Work items are claimed one at a time from a shared counter, and the call
// returns once every item is done: it waits only for items a helper has claimed and is running,
// never for a helper to wake up or to reach a barrier. On a shared machine where a helper is
// descheduled, the call runs at the caller's own speed instead of stalling for a scheduler time
// slice at every fork and join (measured with OpenMP on 2 busy cores: a 6-layer INT8 forward,
// 25 GEMMs, 380 ms at 2 threads against 8 ms at 1).
//
// A helper can still be descheduled while it holds an item, and the caller then waits for it.
// When that happens (the caller waited > 0.3 ms and > 8 item times after finishing its own
// share), the next calls run inline on the caller for 0.2 s, then helpers are tried again: on a
// busy machine the kernels run at one thread's speed instead of stalling at every call.
//
// Helpers spin briefly (~50 us) after a job, then sleep on a condition variable. One job at a
// time: a second caller (another Python thread; the GIL is released in the kernels) runs its
// items itself. After fork() the child starts with no helpers.
#pragma once
#include <cstdint>
#include <functional>

namespace tkd {
namespace pool {

void parallel_for(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn);

// Tests: whether calls currently run inline after a stall, and clearing that state.
bool backing_off();
void reset_backoff();

}  // namespace pool
}  // namespace tkd
