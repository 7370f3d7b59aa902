// Pool of large output blocks (see out_pool.h). Thread-safe: a lease ends wherever torch frees
// the tensor, on any thread, without the GIL.
#include "out_pool.h"

#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <vector>

namespace tkd::outpool {
namespace {

struct Block {
  void* p;
  int64_t bytes;
};

std::mutex mu;
std::vector<Block> idle;  // most recently returned last (reused first: its pages are warm)
int64_t idle_bytes = 0, leased_bytes = 0, leased_blocks = 0, reuses = 0, allocs = 0;
int64_t max_idle = int64_t{256} << 20;

// fork() while another thread holds the lock would leave the child's copy locked forever:
// hold it across fork (prepare), release it in both processes afterwards.
struct AtFork {
  AtFork() {
    pthread_atfork([] { mu.lock(); }, [] { mu.unlock(); }, [] { mu.unlock(); });
  }
} at_fork;

}  // namespace

void* take(int64_t bytes, int64_t* block_bytes) {
  const int64_t want = (std::max<int64_t>(bytes, 1) + kAlign - 1) / kAlign * kAlign;
  *block_bytes = want;
  {
    // The smallest idle block that fits and wastes at most a quarter of itself (batches of
    // varying length ask for nearby sizes); among equals the most recently returned one.
    std::lock_guard<std::mutex> g(mu);
    auto best = idle.end();
    for (auto it = idle.begin(); it != idle.end(); ++it)
      if (it->bytes >= want && it->bytes - want <= it->bytes / 4 &&
          (best == idle.end() || it->bytes <= best->bytes))
        best = it;
    if (best != idle.end()) {
      void* p = best->p;
      *block_bytes = best->bytes;
      idle_bytes -= best->bytes;
      leased_bytes += best->bytes;
      idle.erase(best);
      ++leased_blocks;
      ++reuses;
      return p;
    }
  }
  void* p = std::aligned_alloc(static_cast<size_t>(kAlign), static_cast<size_t>(want));
  if (p == nullptr) return nullptr;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(p, static_cast<size_t>(want), MADV_HUGEPAGE);  // 512x fewer faults where THP is on
#endif
  std::lock_guard<std::mutex> g(mu);
  leased_bytes += want;
  ++leased_blocks;
  ++allocs;
  return p;
}

void give_back(void* p, int64_t block_bytes) {
  {
    std::lock_guard<std::mutex> g(mu);
    leased_bytes -= block_bytes;
    --leased_blocks;
    if (idle_bytes + block_bytes <= max_idle) {
      idle.push_back({p, block_bytes});
      idle_bytes += block_bytes;
      return;
    }
  }
  std::free(p);
}

int64_t release() {
  std::vector<Block> out;
  {
    std::lock_guard<std::mutex> g(mu);
    out.swap(idle);
    idle_bytes = 0;
  }
  int64_t freed = 0;
  for (const Block& b : out) {
    std::free(b.p);
    freed += b.bytes;
  }
  return freed;
}

int64_t set_max_idle(int64_t bytes) {
  int64_t prev;
  std::vector<Block> drop;  // idle blocks beyond the new cap go now, oldest first
  {
    std::lock_guard<std::mutex> g(mu);
    prev = max_idle;
    max_idle = std::max<int64_t>(bytes, 0);
    size_t k = 0;
    while (idle_bytes > max_idle && k < idle.size()) {
      idle_bytes -= idle[k].bytes;
      drop.push_back(idle[k++]);
    }
    idle.erase(idle.begin(), idle.begin() + static_cast<std::ptrdiff_t>(k));
  }
  for (const Block& b : drop) std::free(b.p);
  return prev;
}

Stats stats() {
  std::lock_guard<std::mutex> g(mu);
  return {idle_bytes, static_cast<int64_t>(idle.size()), leased_bytes, leased_blocks, max_idle,
          reuses, allocs};
}

}  // namespace tkd::outpool
