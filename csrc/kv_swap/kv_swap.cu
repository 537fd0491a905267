// CUDA side of the batched block swap: cudaMemcpyBatchAsync (CUDA >= 12.8), a cudaMemcpyAsync per
// coalesced run, or a copy kernel over mapped pinned memory. All three enqueue on the caller's
// stream and return without waiting; the caller records an event after the call.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kv_swap/kv_swap.h"

namespace trail {
namespace kv_swap {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("kv_swap: ") + what + " failed: " +
                             cudaGetErrorString(err));
  }
}

bool is_legacy_default_stream(cudaStream_t s) { return s == nullptr || s == cudaStreamLegacy; }

void copy_memcpy(char* dst, const char* src, int64_t bytes_per_block, const Run* runs, size_t n,
                 cudaStream_t stream) {
  for (size_t i = 0; i < n; ++i) {
    const Run& r = runs[i];
    check(cudaMemcpyAsync(dst + r.dst * bytes_per_block, src + r.src * bytes_per_block,
                          static_cast<size_t>(r.count * bytes_per_block), cudaMemcpyDefault,
                          stream),
          "cudaMemcpyAsync");
  }
}

#if CUDART_VERSION >= 12080
// Descriptors per cudaMemcpyBatchAsync call: drivers have failed on very large batches.
constexpr size_t kBatchChunk = 1024;

// Returns the first failing call's error and, in *done, how many runs were enqueued before it.
cudaError_t copy_batch(char* dst, const char* src, int64_t bytes_per_block,
                       const std::vector<Run>& runs, cudaStream_t stream, size_t* done) {
  cudaMemcpyAttributes attr{};  // location hints stay unset: they only apply to managed memory
  attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
  attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
  std::vector<void*> dsts, srcs;
  std::vector<size_t> sizes;
  size_t attr_idx = 0;  // the one attribute applies from copy 0 on
  for (size_t begin = 0; begin < runs.size(); begin += kBatchChunk) {
    const size_t n = std::min(kBatchChunk, runs.size() - begin);
    dsts.resize(n);
    srcs.resize(n);
    sizes.resize(n);
    for (size_t i = 0; i < n; ++i) {
      const Run& r = runs[begin + i];
      dsts[i] = dst + r.dst * bytes_per_block;
      srcs[i] = const_cast<char*>(src + r.src * bytes_per_block);
      sizes[i] = static_cast<size_t>(r.count * bytes_per_block);
    }
#if CUDART_VERSION >= 13000
    const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), n, &attr,
                                                 &attr_idx, 1, stream);
#else
    size_t fail_idx = 0;
    const cudaError_t err = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), n, &attr,
                                                 &attr_idx, 1, &fail_idx, stream);
#endif
    if (err != cudaSuccess) {
      *done = begin;
      return err;
    }
  }
  *done = runs.size();
  return cudaSuccess;
}

// Set once the driver refused a batch copy: `auto` then uses cudaMemcpyAsync for good.
std::atomic<bool> g_batch_refused{false};
#endif

// ---- copy kernel over mapped pinned memory ----
constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int64_t kTileBytes = int64_t{kThreads} * 16 * kUnroll * 4;  // 64 KiB per CTA step
constexpr int kMaxPairsPerLaunch = 480;
constexpr int kDefaultCtas = 32;

// Passed by value as a kernel parameter (under the classic 4 KiB limit): no staging buffer whose
// lifetime would have to outlast the launch.
struct PairList {
  int32_t n;
  int32_t src[kMaxPairsPerLaunch];
  int32_t dst[kMaxPairsPerLaunch];
};
static_assert(sizeof(PairList) + 64 <= 4096, "kernel parameters must stay under 4 KiB");

// Grid-stride over (pair, 64 KiB tile) work items; each thread moves 16-byte vectors, kUnroll
// loads in flight before the stores (latency over PCIe is ~1-2 us).
__global__ void __launch_bounds__(kThreads)
    copy_blocks_kernel(char* __restrict__ dst, const char* __restrict__ src,
                       int64_t bytes_per_block, int64_t tiles_per_block,
                       const __grid_constant__ PairList pairs) {
  const int64_t total = static_cast<int64_t>(pairs.n) * tiles_per_block;
  for (int64_t t = blockIdx.x; t < total; t += gridDim.x) {
    const int64_t item = t / tiles_per_block;
    const int64_t begin = (t - item * tiles_per_block) * kTileBytes;
    const int64_t rest = bytes_per_block - begin;
    const int64_t len = rest < kTileBytes ? rest : kTileBytes;
    const uint4* s = reinterpret_cast<const uint4*>(
        src + static_cast<int64_t>(pairs.src[item]) * bytes_per_block + begin);
    uint4* d = reinterpret_cast<uint4*>(
        dst + static_cast<int64_t>(pairs.dst[item]) * bytes_per_block + begin);
    const int64_t nvec = len >> 4;
    int64_t i = threadIdx.x;
    for (; i + (kUnroll - 1) * kThreads < nvec; i += kUnroll * kThreads) {
      uint4 v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = s[i + u * kThreads];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) d[i + u * kThreads] = v[u];
    }
    for (; i < nvec; i += kThreads) d[i] = s[i];
  }
}

// The address the device dereferences for `ptr` (the mapped address of pinned host memory).
const char* device_address(const char* ptr) {
  cudaPointerAttributes attr{};
  check(cudaPointerGetAttributes(&attr, ptr), "cudaPointerGetAttributes");
  if (attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged) return ptr;
  if (attr.type == cudaMemoryTypeHost && attr.devicePointer != nullptr)
    return static_cast<const char*>(attr.devicePointer);
  throw std::invalid_argument(
      "kv_swap: the kernel method needs device memory or mapped pinned host memory");
}

void copy_kernel(char* dst, const char* src, int64_t bytes_per_block, const int64_t* pairs,
                 int64_t n, cudaStream_t stream, int ctas) {
  if (bytes_per_block % 16 != 0 || reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      reinterpret_cast<uintptr_t>(src) % 16 != 0)
    throw std::invalid_argument(
        "kv_swap: the kernel method needs 16-byte aligned buffers and blocks (bytes_per_block=" +
        std::to_string(bytes_per_block) + ")");
  char* d = const_cast<char*>(device_address(dst));
  const char* s = device_address(src);
  const int64_t tiles_per_block = (bytes_per_block + kTileBytes - 1) / kTileBytes;
  if (ctas <= 0) ctas = kDefaultCtas;
  PairList list;
  for (int64_t begin = 0; begin < n; begin += kMaxPairsPerLaunch) {
    const int64_t m = std::min<int64_t>(kMaxPairsPerLaunch, n - begin);
    list.n = static_cast<int32_t>(m);
    for (int64_t i = 0; i < m; ++i) {
      const int64_t sb = pairs[2 * (begin + i)], db = pairs[2 * (begin + i) + 1];
      if (sb > INT32_MAX || db > INT32_MAX)
        throw std::invalid_argument("kv_swap: block ids must fit in int32 for the kernel method");
      list.src[i] = static_cast<int32_t>(sb);
      list.dst[i] = static_cast<int32_t>(db);
    }
    const int64_t work = m * tiles_per_block;
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(work, ctas));
    copy_blocks_kernel<<<grid, kThreads, 0, stream>>>(d, s, bytes_per_block, tiles_per_block,
                                                       list);
    check(cudaGetLastError(), "copy_blocks_kernel launch");
  }
}

}  // namespace

Method copy_blocks_cuda(char* dst, const char* src, int64_t bytes_per_block, const int64_t* pairs,
                        int64_t n, Method method, void* stream_handle, int kernel_ctas) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_handle);
  if (method == Method::kHost)
    throw std::invalid_argument("kv_swap: method 'host' needs both buffers in host memory");
  if (method == Method::kKernel) {
    if (n > 0) copy_kernel(dst, src, bytes_per_block, pairs, n, stream, kernel_ctas);
    return Method::kKernel;
  }
  const std::vector<Run> runs = coalesce(pairs, n);
#if CUDART_VERSION >= 12080
  const bool legacy = is_legacy_default_stream(stream);
  if (method == Method::kBatch && legacy)
    throw std::invalid_argument(
        "kv_swap: cudaMemcpyBatchAsync rejects the legacy default stream; pass a created stream");
  if (method == Method::kBatch || (method == Method::kAuto && !legacy && !g_batch_refused)) {
    if (runs.empty()) return Method::kBatch;
    size_t done = 0;
    const cudaError_t err = copy_batch(dst, src, bytes_per_block, runs, stream, &done);
    if (err == cudaSuccess) return Method::kBatch;
    (void)cudaGetLastError();
    if (method == Method::kBatch)
      throw std::runtime_error(std::string("kv_swap: cudaMemcpyBatchAsync failed: ") +
                               cudaGetErrorString(err));
    g_batch_refused = true;
    // Copies are idempotent: the refused chunk is enqueued again, whole, below.
    copy_memcpy(dst, src, bytes_per_block, runs.data() + done, runs.size() - done, stream);
    return Method::kMemcpy;
  }
#else
  (void)is_legacy_default_stream;
  if (method == Method::kBatch)
    throw std::invalid_argument("kv_swap: method 'batch' needs CUDA >= 12.8 at build time");
#endif
  copy_memcpy(dst, src, bytes_per_block, runs.data(), runs.size(), stream);
  return Method::kMemcpy;
}

}  // namespace kv_swap
}  // namespace trail
