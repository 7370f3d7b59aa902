// The CPU kernels' thread pool (see cpu_pool.h).
#include "cpu_pool.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

namespace tkd {
namespace pool {

namespace {

inline void relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

struct Job {
  const std::function<void(int64_t)>* fn;
  int64_t n;
  std::atomic<int64_t> next{0};  // the next unclaimed item
  std::atomic<int64_t> done{0};  // items finished
  std::atomic<int> seats;        // helpers that may still join
};

class Pool {
 public:
  void run(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || threads <= 1 || n <= 1) {  // one job at a time; small: inline
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    grow(static_cast<int>(threads) - 1);
    Job job;
    job.fn = &fn;
    job.n = n;
    job.seats.store(static_cast<int>(threads) - 1);
    job_.store(&job);
    epoch_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      cv_.notify_all();
    }
    work(job);
    while (job.done.load(std::memory_order_acquire) < n) relax();  // claimed by helpers
    job_.store(nullptr);
    while (inside_.load() > 0) relax();  // a helper between reading job_ and leaving it
  }

  void after_fork_in_child() {  // the helpers do not exist in the child: forget them
    helpers_.clear();           // (the std::thread objects are leaked on purpose)
    sleeping_.store(0);
    inside_.store(0);
    job_.store(nullptr);
    new (&mu_) std::mutex();
    new (&run_mu_) std::mutex();
    new (&cv_) std::condition_variable();
  }

 private:
  static void work(Job& job) {
    int64_t i;
    while ((i = job.next.fetch_add(1)) < job.n) {
      (*job.fn)(i);
      job.done.fetch_add(1, std::memory_order_release);
    }
  }

  void grow(int want) {
    while (static_cast<int>(helpers_.size()) < want)
      helpers_.push_back(new std::thread([this] { helper(); }));
  }

  void helper() {
    uint64_t seen = epoch_.load();
    for (;;) {
      const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(50);
      int spins = 0;
      while (epoch_.load(std::memory_order_acquire) == seen) {
        if ((++spins & 255) || std::chrono::steady_clock::now() < spin_until) {
          relax();
          continue;
        }
        std::unique_lock<std::mutex> lk(mu_);
        sleeping_.fetch_add(1);
        cv_.wait(lk, [&] { return epoch_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = epoch_.load(std::memory_order_acquire);
      inside_.fetch_add(1);  // before reading job_: run() waits for us to leave it
      Job* job = job_.load();
      if (job != nullptr && job->seats.fetch_sub(1) > 0) work(*job);
      inside_.fetch_sub(1);
    }
  }

  std::vector<std::thread*> helpers_;
  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::atomic<Job*> job_{nullptr};
  std::atomic<uint64_t> epoch_{0};
  std::atomic<int> inside_{0}, sleeping_{0};
};

Pool& the_pool() {
  static Pool* p = [] {
    auto* q = new Pool();  // never destroyed: helpers may still be parked at exit
#if defined(__unix__)
    pthread_atfork(nullptr, nullptr, [] { the_pool().after_fork_in_child(); });
#endif
    return q;
  }();
  return *p;
}

}  // namespace

void parallel_for(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn) {
  the_pool().run(n, threads, fn);
}

}  // namespace pool
}  // namespace tkd
