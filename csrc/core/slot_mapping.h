// Flat KV-cache positions of tokens: the index of each token's row in a block-major pool.
//   out[i] = block_tables[slot_ids[i], positions[i] / block_size] * block_size
//            + positions[i] % block_size
// A token whose slot id is negative (padding), whose position lies past the table, or whose
// block entry is negative (unallocated) gets -1, which KV writes skip. Plain C++ / CUDA, no torch.
#pragma once
#include <cstdint>

namespace trail {

struct SlotMappingArgs {
  const int32_t* block_tables;  // [num_slots, max_blocks] row-major, row stride in elements
  int64_t num_slots;
  int64_t max_blocks;
  int64_t table_stride;
  const int32_t* slot_ids;      // [n]
  const int64_t* positions;     // [n]
  int64_t n;
  int64_t block_size;
  int64_t* out;                 // [n]
};

inline int64_t slot_of_token(const SlotMappingArgs& a, int64_t i) {
  const int64_t slot = a.slot_ids[i];
  const int64_t pos = a.positions[i];
  if (slot < 0 || slot >= a.num_slots || pos < 0) return -1;
  const int64_t logical = pos / a.block_size;
  if (logical >= a.max_blocks) return -1;
  const int64_t block = a.block_tables[slot * a.table_stride + logical];
  if (block < 0) return -1;
  return block * a.block_size + pos % a.block_size;
}

void slot_mapping_cpu(const SlotMappingArgs& args);
#ifdef TRAIL_WITH_CUDA
void slot_mapping_cuda(const SlotMappingArgs& args, void* stream);
#endif

}  // namespace trail
