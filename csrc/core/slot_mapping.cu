#include <cuda_runtime.h>

#include "core/slot_mapping.h"

namespace trail {
namespace {

__global__ void slot_mapping_kernel(const int32_t* __restrict__ block_tables, int64_t num_slots,
                                    int64_t max_blocks, int64_t table_stride,
                                    const int32_t* __restrict__ slot_ids,
                                    const int64_t* __restrict__ positions, int64_t n,
                                    int64_t block_size, int64_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t slot = slot_ids[i];
  const int64_t pos = positions[i];
  int64_t result = -1;
  if (slot >= 0 && slot < num_slots && pos >= 0 && pos / block_size < max_blocks) {
    const int64_t block = block_tables[slot * table_stride + pos / block_size];
    if (block >= 0) result = block * block_size + pos % block_size;
  }
  out[i] = result;
}

}  // namespace

void slot_mapping_cuda(const SlotMappingArgs& a, void* stream) {
  if (a.n == 0) return;
  constexpr int threads = 256;
  const int64_t blocks = (a.n + threads - 1) / threads;
  slot_mapping_kernel<<<static_cast<unsigned>(blocks), threads, 0,
                        static_cast<cudaStream_t>(stream)>>>(
      a.block_tables, a.num_slots, a.max_blocks, a.table_stride, a.slot_ids, a.positions, a.n,
      a.block_size, a.out);
}

}  // namespace trail
