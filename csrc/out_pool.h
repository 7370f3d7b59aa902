// Pool of large output blocks for the CPU GEMMs (out_pool.cpp), handed to torch through DLPack.
//
// Why: an output above glibc's mmap threshold (32 MiB at most, e.g. M=4096 x N=3072 float32 =
// 48 MiB) is mapped anew at every call and faulted in page by page inside the kernel; on this
// VM that is 16-18 ms per 48 MiB, as long as the GEMM itself (docs/int8_gemm_cpu.md). A block
// leased from the pool comes back when torch frees the tensor's storage (its last view gone,
// the DLPack deleter), and the next call of the same size (or up to a quarter smaller) reuses
// it, already faulted in.
#pragma once
#include <cstdint>

namespace tkd::outpool {

constexpr int64_t kAlign = int64_t{2} << 20;  // 2 MiB: blocks are whole huge pages

// A block of at least `bytes` (rounded up to kAlign; its size in *block_bytes): the smallest
// idle one that fits with at most a quarter of it unused, else a new one (transparent huge
// pages advised). nullptr when out of memory.
void* take(int64_t bytes, int64_t* block_bytes);
// Back from a lease: kept idle while the idle bytes stay within the cap, else freed.
void give_back(void* p, int64_t block_bytes);
// Frees every idle block; returns the bytes freed.
int64_t release();
// The cap on idle bytes (0 frees every block at once on return); returns the previous cap.
int64_t set_max_idle(int64_t bytes);

struct Stats {
  int64_t idle_bytes, idle_blocks, leased_bytes, leased_blocks, max_idle_bytes, reuses, allocs;
};
Stats stats();

}  // namespace tkd::outpool
