// torch bindings of the batched KV block swap (csrc/kv_swap/):
//   kv_swap_methods() -> str[]                 methods this build can run
//   kv_host_alloc(num_bytes, pinned) -> Tensor  uint8 CPU tensor over extension-owned memory
//                                               (cudaHostAlloc when pinned), freed with the tensor
//   kv_swap_blocks(src, dst, pairs, stream, method, kernel_ctas) -> str
//        copies block pairs[i, 0] of src to block pairs[i, 1] of dst, enqueued on the raw
//        cudaStream_t `stream` (torch: `torch.cuda.Stream.cuda_stream`), and returns the method
//        that ran. Both CPU: a synchronous memcpy (`stream` ignored).
//   kv_coalesce(pairs) -> Tensor                 the runs [r, 3] (src, dst, count) a copy uses
// Blocks are dim 0 of contiguous tensors with equal bytes per block.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kv_swap/kv_swap.h"

#ifdef TRAIL_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

namespace trail {
namespace {

namespace ks = kv_swap;

// Core errors -> Python ValueError (bad input) or RuntimeError (CUDA / allocation failures).
template <typename F>
auto translate(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  } catch (const c10::Error&) {
    throw;
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

std::vector<std::string> kv_swap_methods() { return ks::available_methods(); }

at::Tensor kv_host_alloc(int64_t num_bytes, bool pinned) {
  TORCH_CHECK_VALUE(num_bytes > 0, "kv_host_alloc: num_bytes must be positive, got ", num_bytes);
  void* ptr = translate([&] { return ks::host_alloc(static_cast<size_t>(num_bytes), pinned); });
  return at::from_blob(
      ptr, {num_bytes}, [pinned](void* p) { ks::host_free(p, pinned); },
      at::TensorOptions().dtype(at::kByte).device(at::kCPU));
}

void check_pairs(const at::Tensor& pairs) {
  TORCH_CHECK_VALUE(pairs.device().is_cpu() && pairs.scalar_type() == at::kLong,
                    "kv_swap: pairs must be an int64 CPU tensor, got ", pairs.scalar_type(),
                    " on ", pairs.device());
  TORCH_CHECK_VALUE(pairs.numel() == 0 || (pairs.dim() == 2 && pairs.size(1) == 2),
                    "kv_swap: pairs must have shape [n, 2], got ", pairs.sizes());
  TORCH_CHECK_VALUE(pairs.is_contiguous(), "kv_swap: pairs must be contiguous");
}

int64_t bytes_per_block(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.dim() >= 1 && t.size(0) > 0, "kv_swap: ", name,
                    " must have at least one block along dim 0, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "kv_swap: ", name,
                    " must be contiguous (block-major pool or swap space)");
  return static_cast<int64_t>(t.nbytes()) / t.size(0);
}

at::Tensor kv_coalesce(const at::Tensor& pairs) {
  check_pairs(pairs);
  const auto runs = ks::coalesce(pairs.data_ptr<int64_t>(), pairs.numel() / 2);
  at::Tensor out = at::empty({static_cast<int64_t>(runs.size()), 3}, pairs.options());
  int64_t* o = out.data_ptr<int64_t>();
  for (size_t i = 0; i < runs.size(); ++i) {
    o[3 * i] = runs[i].src;
    o[3 * i + 1] = runs[i].dst;
    o[3 * i + 2] = runs[i].count;
  }
  return out;
}

std::string kv_swap_blocks(const at::Tensor& src, const at::Tensor& dst, const at::Tensor& pairs,
                           int64_t stream, const std::string& method_name, int64_t kernel_ctas) {
  check_pairs(pairs);
  const int64_t bpb = bytes_per_block(src, "src");
  TORCH_CHECK_VALUE(bytes_per_block(dst, "dst") == bpb, "kv_swap: src has ", bpb,
                    " bytes per block but dst has ", bytes_per_block(dst, "dst"));
  const ks::Method method = translate([&] { return ks::parse_method(method_name); });
  const int64_t n = pairs.numel() / 2;
  const int64_t* p = pairs.data_ptr<int64_t>();
  translate([&] { ks::validate_pairs(p, n, src.size(0), dst.size(0)); });

  const char* s = static_cast<const char*>(src.data_ptr());
  char* d = static_cast<char*>(dst.data_ptr());
  if (src.device().type() == dst.device().type()) {
    const bool disjoint = d + dst.nbytes() <= s || s + src.nbytes() <= d;
    TORCH_CHECK_VALUE(disjoint || src.device() != dst.device(),
                      "kv_swap: src and dst share memory");
  }

  if (src.device().is_cpu() && dst.device().is_cpu()) {
    TORCH_CHECK_VALUE(method == ks::Method::kAuto || method == ks::Method::kHost,
                      "kv_swap: method '", method_name,
                      "' needs a CUDA tensor; two CPU tensors are copied with 'host'");
    ks::copy_runs_host(d, s, bpb, ks::coalesce(p, n));
    return "host";
  }
#ifdef TRAIL_WITH_CUDA
  TORCH_CHECK_VALUE((src.is_cuda() || src.device().is_cpu()) &&
                        (dst.is_cuda() || dst.device().is_cpu()),
                    "kv_swap: tensors must be on CPU or CUDA, got ", src.device(), " and ",
                    dst.device());
  TORCH_CHECK_VALUE(!(src.is_cuda() && dst.is_cuda()) || src.device() == dst.device(),
                    "kv_swap: src and dst are on different GPUs (", src.device(), ", ",
                    dst.device(), ")");
  for (const at::Tensor* t : {&src, &dst}) {
    TORCH_CHECK_VALUE(t->is_cuda() || ks::is_pinned_host(t->data_ptr()),
                      "kv_swap: the host-side tensor must be page-locked (use the swap space from "
                      "kv_host_alloc(pinned=True)); pageable memory would make the copy "
                      "synchronous");
  }
  const c10::cuda::CUDAGuard guard(src.is_cuda() ? src.device() : dst.device());
  const ks::Method used = translate([&] {
    return ks::copy_blocks_cuda(d, s, bpb, p, n, method, reinterpret_cast<void*>(stream),
                                static_cast<int>(kernel_ctas));
  });
  return ks::method_name(used);
#else
  (void)stream;
  (void)kernel_ctas;
  TORCH_CHECK_VALUE(false, "kv_swap: this build of trail._C is CPU only; got tensors on ",
                    src.device(), " and ", dst.device());
#endif
}

}  // namespace
}  // namespace trail

TORCH_LIBRARY_FRAGMENT(trail, m) {
  m.def("kv_swap_methods() -> str[]", &trail::kv_swap_methods);
  m.def("kv_host_alloc(int num_bytes, bool pinned) -> Tensor", &trail::kv_host_alloc);
  m.def("kv_coalesce(Tensor pairs) -> Tensor", &trail::kv_coalesce);
  m.def(
      "kv_swap_blocks(Tensor src, Tensor(a!) dst, Tensor pairs, int stream, str method, "
      "int kernel_ctas) -> str",
      &trail::kv_swap_blocks);
}
