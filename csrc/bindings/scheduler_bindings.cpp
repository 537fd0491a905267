// torch binding of the scheduler core: the custom class torch.classes.trail.Scheduler.
// Per-slot inputs are CPU tensors (e.g. pinned host buffers the GPU copied into); decisions come
// back as two int64 tensors (scheduled rows, preempted rows; columns in scheduler/scheduler.h and
// python/trail/scheduler.py). Errors from the core surface as RuntimeError with its message.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <exception>
#include <tuple>
#include <vector>

#include "scheduler/scheduler.h"

namespace trail {
namespace {

template <class F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

at::Tensor rows_to_tensor(const std::vector<int64_t>& flat, int64_t cols) {
  at::Tensor t = at::empty({static_cast<int64_t>(flat.size()) / cols, cols}, at::TensorOptions().dtype(at::kLong));
  if (!flat.empty()) std::memcpy(t.data_ptr<int64_t>(), flat.data(), flat.size() * sizeof(int64_t));
  return t;
}

void check_slot_array(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "Scheduler.step: ", what, " must be a CPU tensor (a pinned host buffer), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, "Scheduler.step: ", what, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.numel() == n && t.is_contiguous(), "Scheduler.step: ", what,
              " must be a contiguous vector of max_slots=", n, " entries, got shape ", t.sizes());
}

void check_vector(const at::Tensor& t, at::ScalarType dtype, int64_t n, const char* fn, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous() && t.numel() == n,
              "Scheduler.", fn, ": ", what, " must be a contiguous CPU ", dtype, " vector of ", n, " entries, got ",
              t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

struct SchedulerClass : torch::CustomClassHolder {
  sched::Scheduler core;

  // The config by name: every field of sched::Config exactly once (numbers as double; booleans
  // 0 / 1; the policy as its index). An unknown or missing name is an error naming it.
  static sched::Config make_config(const c10::Dict<std::string, double>& d) {
    static const char* const kNames[] = {
        "policy", "max_slots", "max_batch", "max_tokens_per_step", "max_prefill_chunk", "block_size",
        "num_gpu_blocks", "num_host_blocks", "watermark_blocks", "c", "margin", "max_preemptions", "aging_rate",
        "aging_per_step", "allow_keep", "allow_swap", "bytes_per_token", "pcie_gbps", "recompute_s_per_token", "admit_reserve",
        "reserve_free_frac", "max_forced_evictions", "evict_kv_weight", "resume_forced_first", "resume_preempted_first",
        "memory_preemption"};
    for (const auto& item : d) {
      bool known = false;
      for (const char* name : kNames) known = known || item.key() == name;
      TORCH_CHECK(known, "Scheduler: unknown config field '", item.key(), "'");
    }
    auto get = [&](const char* name) -> double {
      TORCH_CHECK(d.contains(name), "Scheduler: config field '", name, "' is missing");
      return d.at(name);
    };
    auto whole = [&](const char* name, double lo, double hi) -> int64_t {
      const double v = get(name);
      TORCH_CHECK(v == static_cast<double>(static_cast<int64_t>(v)) && v >= lo && v <= hi, "Scheduler: ", name,
                  " must be an integer in [", lo, ", ", hi, "], got ", v);
      return static_cast<int64_t>(v);
    };
    const double i31 = static_cast<double>((int64_t{1} << 31) - 1), i53 = 9007199254740992.0;
    sched::Config cfg;
    cfg.policy = static_cast<sched::Policy>(whole("policy", 0, 3));
    cfg.max_slots = static_cast<int32_t>(whole("max_slots", 1, i31));
    cfg.max_batch = static_cast<int32_t>(whole("max_batch", 1, i31));
    cfg.max_tokens_per_step = whole("max_tokens_per_step", 0, i53);
    cfg.max_prefill_chunk = whole("max_prefill_chunk", 0, i53);
    cfg.block_size = static_cast<int32_t>(whole("block_size", 1, i31));
    cfg.num_gpu_blocks = whole("num_gpu_blocks", 0, i53);
    cfg.num_host_blocks = whole("num_host_blocks", 0, i53);
    cfg.watermark_blocks = whole("watermark_blocks", 0, i53);
    cfg.c = get("c");
    cfg.margin = get("margin");
    cfg.max_preemptions = static_cast<int32_t>(whole("max_preemptions", 0, i31));
    cfg.aging_rate = get("aging_rate");
    cfg.aging_per_step = get("aging_per_step");
    cfg.allow_keep = whole("allow_keep", 0, 1) != 0;
    cfg.allow_swap = whole("allow_swap", 0, 1) != 0;
    cfg.bytes_per_token = get("bytes_per_token");
    cfg.pcie_gbps = get("pcie_gbps");
    cfg.recompute_s_per_token = get("recompute_s_per_token");
    cfg.admit_reserve = get("admit_reserve");
    cfg.reserve_free_frac = get("reserve_free_frac");
    cfg.max_forced_evictions = static_cast<int32_t>(whole("max_forced_evictions", 0, i31));
    cfg.evict_kv_weight = get("evict_kv_weight");
    cfg.resume_forced_first = whole("resume_forced_first", 0, 1) != 0;
    cfg.resume_preempted_first = whole("resume_preempted_first", 0, 1) != 0;
    cfg.memory_preemption = whole("memory_preemption", 0, 1) != 0;
    return cfg;
  }

  explicit SchedulerClass(const c10::Dict<std::string, double>& config)
      : core(guarded([&] { return make_config(config); })) {}

  int64_t add(int64_t id, double arrival, int64_t prompt_len, int64_t max_new_tokens, double prompt_prediction,
              int64_t true_length) {
    return guarded([&] { return core.add(id, arrival, prompt_len, max_new_tokens, prompt_prediction, true_length); });
  }
  int64_t finish(int64_t id) { return guarded([&] { return core.finish(id); }); }
  int64_t cancel(int64_t id) { return guarded([&] { return static_cast<int64_t>(core.cancel(id)); }); }

  at::Tensor add_many(const at::Tensor& ids, const at::Tensor& arrivals, const at::Tensor& prompt_lens,
                      const at::Tensor& max_new_tokens, const at::Tensor& prompt_predictions,
                      const at::Tensor& true_lengths) {
    const int64_t n = ids.numel();
    check_vector(ids, at::kLong, n, "add_many", "ids");
    check_vector(arrivals, at::kDouble, n, "add_many", "arrivals");
    check_vector(prompt_lens, at::kLong, n, "add_many", "prompt_lens");
    check_vector(max_new_tokens, at::kLong, n, "add_many", "max_new_tokens");
    check_vector(prompt_predictions, at::kDouble, n, "add_many", "prompt_predictions");
    check_vector(true_lengths, at::kLong, n, "add_many", "true_lengths");
    at::Tensor slots = at::empty({n}, at::TensorOptions().dtype(at::kInt));
    guarded([&] {
      core.add_many(ids.data_ptr<int64_t>(), arrivals.data_ptr<double>(), prompt_lens.data_ptr<int64_t>(),
                    max_new_tokens.data_ptr<int64_t>(), prompt_predictions.data_ptr<double>(),
                    true_lengths.data_ptr<int64_t>(), n, slots.data_ptr<int32_t>());
    });
    return slots;
  }

  at::Tensor finish_many(const at::Tensor& ids) {
    check_vector(ids, at::kLong, ids.numel(), "finish_many", "ids");
    at::Tensor slots = at::empty({ids.numel()}, at::TensorOptions().dtype(at::kInt));
    guarded([&] { core.finish_many(ids.data_ptr<int64_t>(), ids.numel(), slots.data_ptr<int32_t>()); });
    return slots;
  }

  at::Tensor cancel_many(const at::Tensor& ids) {
    check_vector(ids, at::kLong, ids.numel(), "cancel_many", "ids");
    at::Tensor states = at::empty({ids.numel()}, at::TensorOptions().dtype(at::kInt));
    guarded([&] { core.cancel_many(ids.data_ptr<int64_t>(), ids.numel(), states.data_ptr<int32_t>()); });
    return states;
  }

  at::Tensor requeue_many(const at::Tensor& ids, const at::Tensor& generated, double now) {
    check_vector(ids, at::kLong, ids.numel(), "requeue_many", "ids");
    check_vector(generated, at::kInt, ids.numel(), "requeue_many", "generated");
    at::Tensor states = at::empty({ids.numel()}, at::TensorOptions().dtype(at::kInt));
    guarded([&] {
      core.requeue_many(ids.data_ptr<int64_t>(), generated.data_ptr<int32_t>(), ids.numel(), now,
                        states.data_ptr<int32_t>());
    });
    return states;
  }

  void set_predictions(const at::Tensor& slots, const at::Tensor& values) {
    TORCH_CHECK(slots.device().is_cpu() && values.device().is_cpu(), "Scheduler.set_predictions: CPU tensors only");
    TORCH_CHECK(slots.scalar_type() == at::kInt && slots.dim() == 1 && slots.is_contiguous(),
                "Scheduler.set_predictions: slots must be a contiguous int32 vector");
    TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 1 && values.is_contiguous(),
                "Scheduler.set_predictions: values must be a contiguous float32 vector");
    TORCH_CHECK(slots.numel() == values.numel(), "Scheduler.set_predictions: ", slots.numel(), " slots but ",
                values.numel(), " values");
    guarded([&] { core.set_predictions(slots.data_ptr<int32_t>(), values.data_ptr<float>(), slots.numel()); });
  }

  // (scheduled rows, preempted rows, stop reason): one call per step.
  std::tuple<at::Tensor, at::Tensor, int64_t> step(const at::Tensor& predictions, const at::Tensor& generated,
                                          int64_t free_gpu_blocks, int64_t free_host_blocks, double now) {
    const int64_t n = core.config().max_slots;
    check_slot_array(predictions, at::kFloat, n, "predictions");
    check_slot_array(generated, at::kInt, n, "generated");
    const sched::StepOutput& out = guarded([&]() -> const sched::StepOutput& {
      return core.step(predictions.data_ptr<float>(), generated.data_ptr<int32_t>(), free_gpu_blocks,
                       free_host_blocks, now);
    });
    return {rows_to_tensor(out.scheduled, sched::kSchedCols), rows_to_tensor(out.preempted, sched::kPreemptCols),
            static_cast<int64_t>(out.stop_reason)};
  }

  at::Tensor snapshot() {
    const std::vector<double> rows = core.snapshot();
    at::Tensor t = at::empty({static_cast<int64_t>(rows.size()) / sched::kSnapCols, sched::kSnapCols},
                             at::TensorOptions().dtype(at::kDouble));
    if (!rows.empty()) std::memcpy(t.data_ptr<double>(), rows.data(), rows.size() * sizeof(double));
    return t;
  }
};

}  // namespace
}  // namespace trail

TORCH_LIBRARY_FRAGMENT(trail, m) {
  using trail::SchedulerClass;
  m.class_<SchedulerClass>("Scheduler")
      .def(torch::init<c10::Dict<std::string, double>>())
      .def("add", &SchedulerClass::add)
      .def("add_many", &SchedulerClass::add_many)
      .def("finish", &SchedulerClass::finish)
      .def("finish_many", &SchedulerClass::finish_many)
      .def("cancel_many", &SchedulerClass::cancel_many)
      .def("cancel", &SchedulerClass::cancel)
      .def("requeue_many", &SchedulerClass::requeue_many)
      .def("set_predictions", &SchedulerClass::set_predictions)
      .def("step", &SchedulerClass::step)
      .def("snapshot", &SchedulerClass::snapshot)
      .def("stop_reason", [](const c10::intrusive_ptr<SchedulerClass>& self) -> int64_t {
        return self->core.last_stop_reason();
      })
      .def("num_waiting", [](const c10::intrusive_ptr<SchedulerClass>& self) -> int64_t { return self->core.num_waiting(); })
      .def("num_running", [](const c10::intrusive_ptr<SchedulerClass>& self) -> int64_t { return self->core.num_running(); })
      .def("num_active", [](const c10::intrusive_ptr<SchedulerClass>& self) -> int64_t { return self->core.num_active(); })
      .def("slot_of", [](const c10::intrusive_ptr<SchedulerClass>& self, int64_t id) -> int64_t {
        return trail::guarded([&] { return static_cast<int64_t>(self->core.slot_of(id)); });
      })
      .def("state_of", [](const c10::intrusive_ptr<SchedulerClass>& self, int64_t id) -> int64_t {
        return trail::guarded([&] { return static_cast<int64_t>(self->core.state_of(id)); });
      });
}
