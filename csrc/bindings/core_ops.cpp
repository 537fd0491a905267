// torch bindings of the core ops: native_info and slot_mapping (CPU and CUDA).
// This file opens the `trail` op namespace; the other binding files add to it with
// TORCH_LIBRARY_FRAGMENT.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <string>

#include "core/slot_mapping.h"

#ifdef TRAIL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

namespace trail {
namespace {

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

std::string native_info() {
  std::string info = "{";
#ifdef TRAIL_WITH_CUDA
  info += "\"build\": \"cuda\", ";
  info += "\"cuda_version\": \"" TRAIL_CUDA_VERSION "\", ";
  info += "\"cuda_arch_list\": \"" TRAIL_CUDA_ARCHS "\", ";
  info += "\"cuda_flags\": \"" + json_escape(TRAIL_CUDA_FLAGS) + "\", ";
#else
  info += "\"build\": \"cpu\", ";
#endif
  info += "\"torch_version\": \"" TRAIL_TORCH_VERSION "\", ";
  info += "\"build_type\": \"" TRAIL_BUILD_TYPE "\", ";
  info += "\"cxx_flags\": \"" + json_escape(TRAIL_CXX_FLAGS) + "\", ";
  info += "\"compiler\": \"" + json_escape(__VERSION__) + "\"}";
  return info;
}

SlotMappingArgs make_args(const at::Tensor& block_tables, const at::Tensor& slot_ids,
                          const at::Tensor& positions, int64_t block_size,
                          const at::Tensor& out) {
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == at::kInt,
              "slot_mapping: block_tables must be int32 [num_slots, max_blocks], got ",
              block_tables.scalar_type(), " ", block_tables.sizes());
  TORCH_CHECK(block_tables.stride(1) == 1, "slot_mapping: block_tables rows must be contiguous");
  TORCH_CHECK(slot_ids.dim() == 1 && slot_ids.scalar_type() == at::kInt && slot_ids.is_contiguous(),
              "slot_mapping: slot_ids must be a contiguous int32 vector");
  TORCH_CHECK(positions.dim() == 1 && positions.scalar_type() == at::kLong &&
                  positions.is_contiguous(),
              "slot_mapping: positions must be a contiguous int64 vector");
  TORCH_CHECK(slot_ids.numel() == positions.numel(), "slot_mapping: slot_ids has ",
              slot_ids.numel(), " entries but positions has ", positions.numel());
  TORCH_CHECK(block_size > 0, "slot_mapping: block_size must be positive, got ", block_size);
  TORCH_CHECK(block_tables.device() == slot_ids.device() && slot_ids.device() == positions.device(),
              "slot_mapping: all tensors must be on one device");
  return SlotMappingArgs{block_tables.data_ptr<int32_t>(), block_tables.size(0),
                         block_tables.size(1), block_tables.stride(0),
                         slot_ids.data_ptr<int32_t>(), positions.data_ptr<int64_t>(),
                         positions.numel(), block_size, out.data_ptr<int64_t>()};
}

at::Tensor slot_mapping_cpu_op(const at::Tensor& block_tables, const at::Tensor& slot_ids,
                               const at::Tensor& positions, int64_t block_size) {
  at::Tensor out = at::empty({positions.numel()}, positions.options().dtype(at::kLong));
  slot_mapping_cpu(make_args(block_tables, slot_ids, positions, block_size, out));
  return out;
}

#ifdef TRAIL_WITH_CUDA
at::Tensor slot_mapping_cuda_op(const at::Tensor& block_tables, const at::Tensor& slot_ids,
                                const at::Tensor& positions, int64_t block_size) {
  c10::cuda::CUDAGuard guard(positions.device());
  at::Tensor out = at::empty({positions.numel()}, positions.options().dtype(at::kLong));
  slot_mapping_cuda(make_args(block_tables, slot_ids, positions, block_size, out),
                    c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(cudaGetLastError());
  return out;
}
#endif

}  // namespace
}  // namespace trail

TORCH_LIBRARY(trail, m) {
  m.def("native_info() -> str", &trail::native_info);
  m.def("slot_mapping(Tensor block_tables, Tensor slot_ids, Tensor positions, int block_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(trail, CPU, m) { m.impl("slot_mapping", &trail::slot_mapping_cpu_op); }

#ifdef TRAIL_WITH_CUDA
TORCH_LIBRARY_IMPL(trail, CUDA, m) { m.impl("slot_mapping", &trail::slot_mapping_cuda_op); }
#endif
