// Batched KV block copies between two block-major buffers (GPU pool <-> pinned host swap space),
// and the host memory they use. Plain C++17 / CUDA, no torch types: the torch binding is
// csrc/bindings/kv_swap_bindings.cpp.
//
// A buffer is `num_blocks` blocks of `bytes_per_block` contiguous bytes. A copy is a list of
// (src_block, dst_block) pairs; sources may repeat, destinations may not. Runs of pairs where both
// the source and the destination advance by one block are merged into one contiguous copy.
//
// Methods (CUDA builds; one side may be host memory from host_alloc(pinned=true)):
//   batch   one cudaMemcpyBatchAsync per chunk of runs (CUDA >= 12.8): DMA engines, no SMs
//   memcpy  one cudaMemcpyAsync per run: DMA engines, no SMs, one API call per run
//   kernel  a copy kernel reading / writing mapped pinned memory: no per-copy API cost, but it
//           occupies SMs that the compute stream would otherwise use
//   host    std::memcpy (both buffers in host memory; the CPU build's only method)
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace trail {
namespace kv_swap {

enum class Method { kAuto, kBatch, kMemcpy, kKernel, kHost };

Method parse_method(const std::string& name);  // throws std::invalid_argument
const char* method_name(Method m);
// Methods this build can run, "auto" excluded.
std::vector<std::string> available_methods();

// A contiguous copy of `count` blocks: src blocks [src, src + count) -> dst [dst, dst + count).
struct Run {
  int64_t src;
  int64_t dst;
  int64_t count;
};

// Checks a [n, 2] row-major list of pairs: block ids inside both buffers, no destination twice.
// Throws std::invalid_argument naming the first bad pair.
void validate_pairs(const int64_t* pairs, int64_t n, int64_t src_blocks, int64_t dst_blocks);

// Merges consecutive pairs (in the given order) whose source and destination both advance by 1.
std::vector<Run> coalesce(const int64_t* pairs, int64_t n);

// Synchronous host copy of the runs.
void copy_runs_host(char* dst, const char* src, int64_t bytes_per_block,
                    const std::vector<Run>& runs);

// Host memory for the swap space, page aligned. pinned=true uses cudaHostAlloc (portable,
// mapped) in CUDA builds; otherwise (and in CPU builds) an aligned malloc. Throws on failure.
void* host_alloc(size_t bytes, bool pinned);
void host_free(void* ptr, bool pinned) noexcept;

#ifdef TRAIL_WITH_CUDA
// Enqueues the copy on `stream` (a cudaStream_t) and returns the method that ran. `dst` / `src`
// are device pointers or pinned host pointers (host_alloc(pinned=true) or any cudaHostAlloc'd
// memory). kAuto picks batch where available (not on the legacy default stream, which
// cudaMemcpyBatchAsync rejects) and falls back to memcpy if the driver refuses batch copies.
// kernel_ctas: CTAs of the copy kernel (0: the default). Throws std::runtime_error on CUDA errors.
Method copy_blocks_cuda(char* dst, const char* src, int64_t bytes_per_block, const int64_t* pairs,
                        int64_t n, Method method, void* stream, int kernel_ctas);

// True if `ptr` is page-locked host memory known to CUDA.
bool is_pinned_host(const void* ptr);
#endif

}  // namespace kv_swap
}  // namespace trail
