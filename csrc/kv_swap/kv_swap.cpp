// Host side of the batched block swap: pair validation, run coalescing, the host copy, and the
// swap-space allocation (cudaHostAlloc in CUDA builds, aligned malloc otherwise).
#include "kv_swap/kv_swap.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef TRAIL_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace trail {
namespace kv_swap {

namespace {
constexpr size_t kPage = 4096;
}

Method parse_method(const std::string& name) {
  if (name == "auto") return Method::kAuto;
  if (name == "batch") return Method::kBatch;
  if (name == "memcpy") return Method::kMemcpy;
  if (name == "kernel") return Method::kKernel;
  if (name == "host") return Method::kHost;
  throw std::invalid_argument("kv_swap: unknown method '" + name +
                              "' (expected auto, batch, memcpy, kernel or host)");
}

const char* method_name(Method m) {
  switch (m) {
    case Method::kAuto: return "auto";
    case Method::kBatch: return "batch";
    case Method::kMemcpy: return "memcpy";
    case Method::kKernel: return "kernel";
    case Method::kHost: return "host";
  }
  return "?";
}

std::vector<std::string> available_methods() {
  std::vector<std::string> out;
#ifdef TRAIL_WITH_CUDA
#if CUDART_VERSION >= 12080
  out.push_back("batch");
#endif
  out.push_back("memcpy");
  out.push_back("kernel");
#endif
  out.push_back("host");
  return out;
}

void validate_pairs(const int64_t* pairs, int64_t n, int64_t src_blocks, int64_t dst_blocks) {
  std::vector<uint8_t> seen(static_cast<size_t>(dst_blocks), 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = pairs[2 * i], d = pairs[2 * i + 1];
    if (s < 0 || s >= src_blocks)
      throw std::invalid_argument("kv_swap: pair " + std::to_string(i) + " has source block " +
                                  std::to_string(s) + " outside [0, " +
                                  std::to_string(src_blocks) + ")");
    if (d < 0 || d >= dst_blocks)
      throw std::invalid_argument("kv_swap: pair " + std::to_string(i) +
                                  " has destination block " + std::to_string(d) +
                                  " outside [0, " + std::to_string(dst_blocks) + ")");
    if (seen[static_cast<size_t>(d)])
      throw std::invalid_argument("kv_swap: destination block " + std::to_string(d) +
                                  " appears twice (pair " + std::to_string(i) + ")");
    seen[static_cast<size_t>(d)] = 1;
  }
}

std::vector<Run> coalesce(const int64_t* pairs, int64_t n) {
  std::vector<Run> runs;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t s = pairs[2 * i], d = pairs[2 * i + 1];
    if (!runs.empty()) {
      Run& last = runs.back();
      if (s == last.src + last.count && d == last.dst + last.count) {
        ++last.count;
        continue;
      }
    }
    runs.push_back(Run{s, d, 1});
  }
  return runs;
}

void copy_runs_host(char* dst, const char* src, int64_t bytes_per_block,
                    const std::vector<Run>& runs) {
  for (const Run& r : runs) {
    std::memcpy(dst + r.dst * bytes_per_block, src + r.src * bytes_per_block,
                static_cast<size_t>(r.count * bytes_per_block));
  }
}

void* host_alloc(size_t bytes, bool pinned) {
  if (bytes == 0) throw std::invalid_argument("kv_swap: host_alloc of 0 bytes");
  const size_t rounded = (bytes + kPage - 1) / kPage * kPage;
#ifdef TRAIL_WITH_CUDA
  if (pinned) {
    void* ptr = nullptr;
    const cudaError_t err =
        cudaHostAlloc(&ptr, rounded, cudaHostAllocPortable | cudaHostAllocMapped);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      throw std::runtime_error("kv_swap: cudaHostAlloc of " + std::to_string(rounded) +
                               " bytes failed: " + cudaGetErrorString(err));
    }
    return ptr;
  }
#else
  if (pinned)
    throw std::invalid_argument(
        "kv_swap: pinned host memory needs a CUDA build of trail._C (this build is CPU only)");
#endif
  void* ptr = std::aligned_alloc(kPage, rounded);
  if (ptr == nullptr)
    throw std::runtime_error("kv_swap: could not allocate " + std::to_string(rounded) +
                             " bytes of host memory");
  return ptr;
}

void host_free(void* ptr, bool pinned) noexcept {
  if (ptr == nullptr) return;
#ifdef TRAIL_WITH_CUDA
  if (pinned) {
    // At interpreter exit the runtime may already be unloaded; the OS reclaims the memory then.
    if (cudaFreeHost(ptr) != cudaSuccess) (void)cudaGetLastError();
    return;
  }
#endif
  (void)pinned;
  std::free(ptr);
}

#ifdef TRAIL_WITH_CUDA
bool is_pinned_host(const void* ptr) {
  cudaPointerAttributes attr{};
  if (cudaPointerGetAttributes(&attr, ptr) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.type == cudaMemoryTypeHost;
}
#endif

}  // namespace kv_swap
}  // namespace trail
