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
// Helpers spin briefly (~50 us) after a job, then sleep on a condition variable. One job at a
// time: a second caller (another Python thread; the GIL is released in the kernels) runs its
// items itself. After fork() the child starts with no helpers.
#pragma once
#include <cstdint>
#include <functional>

namespace tkd {
namespace pool {

void parallel_for(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn);

}  // namespace pool
}  // namespace tkd
