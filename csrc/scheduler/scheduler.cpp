// The policy step (see scheduler.h for the contract and DESIGN.md "Policy" for the rules).
// One step: (1) refresh running keys from the per-slot predictions and generated counts,
// (2) plan the running requests (decodes, then prefill chunks in key order), (3) memory always
// wins: while the plan + watermark does not fit, evict kept-on-GPU requests, then the preemptible
// running request with the largest key, then any running request with the largest key,
// (4) admit from the waiting queue in key order; a head that does not fit preempts the largest-key
// preemptible running request when that key exceeds the head's by `margin`, until it fits, else
// admission stops. Requests preempted or evicted in this step are not readmitted in it.
// Options (off by default, see scheduler.h): memory-aware admission (admit_reserve), forced victims
// by predicted remaining and KV held with a per-request bound, forced-evicted requests resumed first.
#include "scheduler/scheduler.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace trail::sched {

namespace {

[[noreturn]] void bad(const std::string& msg) { throw std::invalid_argument(msg); }

constexpr double kFrontKey = -1e300;  // waiting key of a forced-evicted request (resume_forced_first)

}  // namespace

void Config::validate() const {
  const int32_t p = static_cast<int32_t>(policy);
  if (p < 0 || p > 3) bad("scheduler config: policy must be 0..3 (fcfs, sjf_prompt, trail, oracle), got " + std::to_string(p));
  if (max_slots < 1) bad("scheduler config: max_slots must be >= 1, got " + std::to_string(max_slots));
  if (max_batch < 1) bad("scheduler config: max_batch must be >= 1, got " + std::to_string(max_batch));
  if (max_tokens_per_step < max_batch)
    bad("scheduler config: max_tokens_per_step (" + std::to_string(max_tokens_per_step) +
        ") must be >= max_batch (" + std::to_string(max_batch) + ") so every running request can decode");
  if (max_prefill_chunk < 1) bad("scheduler config: max_prefill_chunk must be >= 1");
  if (block_size < 1) bad("scheduler config: block_size must be >= 1, got " + std::to_string(block_size));
  if (watermark_blocks < 0) bad("scheduler config: watermark_blocks must be >= 0");
  if (num_gpu_blocks <= watermark_blocks)
    bad("scheduler config: num_gpu_blocks (" + std::to_string(num_gpu_blocks) + ") must exceed watermark_blocks (" +
        std::to_string(watermark_blocks) + ")");
  if (num_host_blocks < 0) bad("scheduler config: num_host_blocks must be >= 0");
  if (!(c >= 0) || !std::isfinite(c)) bad("scheduler config: c must be a finite number >= 0");
  if (!std::isfinite(margin)) bad("scheduler config: margin must be finite");
  if (max_preemptions < 0) bad("scheduler config: max_preemptions must be >= 0");
  if (!(aging_rate >= 0) || !std::isfinite(aging_rate)) bad("scheduler config: aging_rate must be finite and >= 0");
  if (!(aging_per_step >= 0) || !std::isfinite(aging_per_step))
    bad("scheduler config: aging_per_step must be finite and >= 0");
  if (!(bytes_per_token >= 0) || !std::isfinite(bytes_per_token)) bad("scheduler config: bytes_per_token must be finite and >= 0");
  if (!(pcie_gbps > 0) || !std::isfinite(pcie_gbps)) bad("scheduler config: pcie_gbps must be finite and > 0");
  if (!(recompute_s_per_token >= 0) || !std::isfinite(recompute_s_per_token))
    bad("scheduler config: recompute_s_per_token must be finite and >= 0");
  if (!(admit_reserve >= 0) || !std::isfinite(admit_reserve)) bad("scheduler config: admit_reserve must be finite and >= 0");
  if (!(reserve_free_frac >= 0 && reserve_free_frac <= 1))
    bad("scheduler config: reserve_free_frac must be in [0, 1]");
  if (max_forced_evictions < 0) bad("scheduler config: max_forced_evictions must be >= 0");
  if (!(evict_kv_weight >= 0) || !std::isfinite(evict_kv_weight))
    bad("scheduler config: evict_kv_weight must be finite and >= 0");
}

Scheduler::Scheduler(const Config& config)
    : cfg_(config),
      waiting_((config.validate(), config.max_slots)),
      kept_(config.max_slots),
      pre_(config.max_slots),
      nonpre_(config.max_slots) {
  table_.resize(static_cast<size_t>(cfg_.max_slots));
  free_slots_.reserve(static_cast<size_t>(cfg_.max_slots));
  for (int32_t s = cfg_.max_slots - 1; s >= 0; --s) free_slots_.push_back(s);
  by_id_.reserve(static_cast<size_t>(cfg_.max_slots) * 2);
  running_.reserve(static_cast<size_t>(cfg_.max_batch) + 1);
}

int32_t Scheduler::lookup(int64_t id, const char* what) const {
  auto it = by_id_.find(id);
  if (it == by_id_.end()) bad(std::string(what) + ": unknown request id " + std::to_string(id));
  return it->second;
}

int32_t Scheduler::slot_of(int64_t id) const { return lookup(id, "slot_of"); }
State Scheduler::state_of(int64_t id) const { return table_[lookup(id, "state_of")].state; }

bool Scheduler::preemptible(const Request& r) const {
  return cfg_.c > 0 && static_cast<double>(r.gen) < cfg_.c * r.init && r.preemptions < cfg_.max_preemptions;
}

bool Scheduler::at_front(const Request& r) const {
  return (cfg_.resume_forced_first && r.forced_wait) || (cfg_.resume_preempted_first && r.preempted_wait);
}

double Scheduler::wait_s(const Request& r) const {
  if (at_front(r)) return kFrontKey;
  return r.key + cfg_.aging_rate * (r.t_enq - r.waited) + cfg_.aging_per_step * static_cast<double>(r.k_enq - r.kwaited);
}

void Scheduler::bad_running(int32_t s, const char* what, double value, double bound) const {
  const Request& r = table_[s];
  const std::string who = "step: slot " + std::to_string(s) + " (id " + std::to_string(r.id) + ")";
  const std::string what_s(what);
  if (what_s == "below")
    bad(who + ": generated count " + std::to_string(static_cast<int64_t>(value)) + " is below last step's " +
        std::to_string(static_cast<int64_t>(bound)));
  if (what_s == "above")
    bad(who + ": generated count " + std::to_string(static_cast<int64_t>(value)) + " exceeds max_new_tokens " +
        std::to_string(static_cast<int64_t>(bound)));
  bad(who + ": prediction " + std::to_string(value) + " is not a finite number >= 0");
}

double Scheduler::pred_remaining(const Request& r) const {
  switch (cfg_.policy) {
    case Policy::kTrail: return r.key;
    case Policy::kOracle: return static_cast<double>(std::max<int64_t>(r.true_total - r.gen, 0));
    default: return std::max(r.prompt_pred - static_cast<double>(r.gen), 0.0);
  }
}

std::pair<int64_t, int64_t> Scheduler::peak_entry(const Request& r, int64_t tokens) const {
  const int64_t base = std::max(r.ctx + tokens, r.target);
  const int64_t cap = std::max<int64_t>(r.max_new - r.gen, 1);
  const double want = cfg_.admit_reserve * pred_remaining(r);
  const int64_t rem = want >= static_cast<double>(cap) ? cap : std::max<int64_t>(static_cast<int64_t>(std::ceil(want)), 1);
  return {rem, base};
}

namespace {
bool by_rem_desc(const std::pair<int64_t, int64_t>& a, const std::pair<int64_t, int64_t>& b) { return a.first > b.first; }
}  // namespace

void Scheduler::peak_insert(int32_t slot) {
  const Request& r = table_[slot];
  const auto e = peak_entry(r, r.plan_tokens);
  peak_.insert(std::upper_bound(peak_.begin(), peak_.end(), e, by_rem_desc), e);
  peak_held_ += blocks(r.ctx + r.plan_tokens);
}

void Scheduler::peak_remove(int32_t slot) {
  const Request& r = table_[slot];
  const auto e = peak_entry(r, r.plan_tokens);
  auto range = std::equal_range(peak_.begin(), peak_.end(), e, by_rem_desc);
  auto it = std::find(range.first, range.second, e);
  if (it == range.second) { peak_valid_ = false; return; }  // cannot happen; rebuild to be safe
  peak_.erase(it);
  peak_held_ -= blocks(r.ctx + r.plan_tokens);
}

bool Scheduler::reserve_fits(int32_t h, int64_t t, int64_t gpu_left) {
  // Integer arithmetic in units of 1/block_size block: usage(tau) <= sum over requests still
  // running at tau of (base + tau + bs - 1), an upper bound of their blocks; the peak is at
  // tau = R_k - 1 for some k (just before a request ends). Within equal R the running sum only
  // grows, so the maximum does not depend on the order of ties (the reference sorts afresh).
  const int64_t bs = cfg_.block_size;
  if (!peak_valid_) {
    peak_.clear();
    peak_held_ = 0;
    for (int32_t s : running_) {
      const Request& r = table_[s];
      peak_.push_back(peak_entry(r, r.plan_tokens));
      peak_held_ += blocks(r.ctx + r.plan_tokens);
    }
    std::sort(peak_.begin(), peak_.end(), by_rem_desc);
    peak_valid_ = true;
  }
  const Request& rh = table_[h];
  const auto [rem_h, base_h] = peak_entry(rh, t);
  int64_t sum = 0, best = 0, k = 0;
  bool placed = false;
  for (const auto& [rem, base] : peak_) {
    if (!placed && rem_h >= rem) {
      sum += base_h;
      ++k;
      best = std::max(best, sum + k * (rem_h - 1 + bs - 1));
      placed = true;
    }
    sum += base;
    ++k;
    best = std::max(best, sum + k * (rem - 1 + bs - 1));
  }
  if (!placed) {
    sum += base_h;
    ++k;
    best = std::max(best, sum + k * (rem_h - 1 + bs - 1));
  }
  return best <= (gpu_left + peak_held_ + blocks(rh.ctx + t) - cfg_.watermark_blocks) * bs;
}

int32_t Scheduler::forced_victim() const {
  if (cfg_.max_forced_evictions == 0 && cfg_.evict_kv_weight == 0) {
    if (!pre_.empty()) return pre_.top();
    if (!nonpre_.empty()) return nonpre_.top();
    return -1;
  }
  // the progress anchor: the running request holding the most KV (then the earliest, then the
  // lowest id) is never the victim while another runs, so its KV only grows until it finishes
  // (without it, requests evicted by turns can recompute forever: a livelock the property test found)
  int32_t anchor = -1;
  if (running_.size() > 1) {
    for (int32_t s : running_) {
      const Request& r = table_[s];
      if (anchor >= 0) {
        const Request& a = table_[anchor];
        if (r.ctx != a.ctx ? r.ctx < a.ctx : (r.arrival != a.arrival ? r.arrival > a.arrival : r.id > a.id)) continue;
      }
      anchor = s;
    }
  }
  int32_t best = -1;
  bool best_ok = false;
  double best_score = 0;
  for (int32_t s : running_) {
    if (s == anchor) continue;
    const Request& r = table_[s];
    const bool ok = cfg_.max_forced_evictions == 0 || r.forced < cfg_.max_forced_evictions;
    const double score = pred_remaining(r) - cfg_.evict_kv_weight * static_cast<double>(r.ctx);
    bool better = best < 0;
    if (!better) {
      const Request& b = table_[best];
      if (ok != best_ok) better = ok;
      else if (score != best_score) better = score > best_score;
      else if (r.arrival != b.arrival) better = r.arrival > b.arrival;
      else better = r.id > b.id;
    }
    if (better) { best = s; best_ok = ok; best_score = score; }
  }
  return best;
}

void Scheduler::check_add(int64_t id, double arrival, int64_t prompt_len, int64_t max_new_tokens,
                          double prompt_prediction, int64_t true_length) const {
  const std::string who = "add(id=" + std::to_string(id) + ")";
  if (by_id_.count(id)) bad(who + ": a request with this id is already active");
  if (!std::isfinite(arrival)) bad(who + ": arrival must be finite");
  if (prompt_len < 1) bad(who + ": prompt_len must be >= 1, got " + std::to_string(prompt_len));
  if (max_new_tokens < 1) bad(who + ": max_new_tokens must be >= 1, got " + std::to_string(max_new_tokens));
  if (!(std::isfinite(prompt_prediction) && prompt_prediction >= 0))
    bad(who + ": prompt_prediction " + std::to_string(prompt_prediction) + " is not a finite number >= 0");
  if (cfg_.policy == Policy::kOracle && true_length < 1)
    bad(who + ": the oracle policy needs true_length >= 1, got " + std::to_string(true_length));
  const int64_t most = blocks(prompt_len + max_new_tokens);
  if (most > cfg_.num_gpu_blocks - cfg_.watermark_blocks)
    bad(who + ": prompt_len + max_new_tokens needs " + std::to_string(most) + " KV blocks, more than the " +
        std::to_string(cfg_.num_gpu_blocks - cfg_.watermark_blocks) + " usable (num_gpu_blocks - watermark)");
}

int32_t Scheduler::add(int64_t id, double arrival, int64_t prompt_len, int64_t max_new_tokens,
                       double prompt_prediction, int64_t true_length) {
  check_add(id, arrival, prompt_len, max_new_tokens, prompt_prediction, true_length);
  if (free_slots_.empty())
    bad("add(id=" + std::to_string(id) + "): no free slot (max_slots=" + std::to_string(cfg_.max_slots) + ")");
  return add_unchecked(id, arrival, prompt_len, max_new_tokens, prompt_prediction, true_length);
}

void Scheduler::add_many(const int64_t* ids, const double* arrivals, const int64_t* prompt_lens,
                         const int64_t* max_new_tokens, const double* prompt_predictions,
                         const int64_t* true_lengths, int64_t n, int32_t* slots_out) {
  if (n > static_cast<int64_t>(free_slots_.size()))
    bad("add_many: " + std::to_string(n) + " requests but only " + std::to_string(free_slots_.size()) +
        " free slots (max_slots=" + std::to_string(cfg_.max_slots) + ")");
  std::unordered_map<int64_t, int64_t> seen;
  seen.reserve(static_cast<size_t>(n) * 2);
  for (int64_t i = 0; i < n; ++i) {
    check_add(ids[i], arrivals[i], prompt_lens[i], max_new_tokens[i], prompt_predictions[i], true_lengths[i]);
    if (!seen.emplace(ids[i], i).second) bad("add_many: id " + std::to_string(ids[i]) + " appears twice");
  }
  for (int64_t i = 0; i < n; ++i)
    slots_out[i] = add_unchecked(ids[i], arrivals[i], prompt_lens[i], max_new_tokens[i], prompt_predictions[i],
                                 true_lengths[i]);
}

int32_t Scheduler::add_unchecked(int64_t id, double arrival, int64_t prompt_len, int64_t max_new_tokens,
                                 double prompt_prediction, int64_t true_length) {
  const int32_t slot = free_slots_.back();
  free_slots_.pop_back();
  Request& r = table_[slot];
  r = Request{};
  r.id = id;
  r.arrival = arrival;
  r.prompt_len = prompt_len;
  r.max_new = max_new_tokens;
  r.true_total = true_length >= 0 ? std::min(true_length, max_new_tokens) : -1;
  r.prompt_pred = prompt_prediction;
  switch (cfg_.policy) {
    case Policy::kFcfs: r.key = arrival; break;
    case Policy::kOracle: r.key = static_cast<double>(r.true_total); break;
    default: r.key = prompt_prediction;
  }
  r.init = cfg_.policy == Policy::kOracle ? static_cast<double>(r.true_total) : prompt_prediction;
  r.init_pending = cfg_.policy == Policy::kTrail;
  r.target = prompt_len;
  r.state = State::kWaiting;
  by_id_.emplace(id, slot);
  enqueue(slot, arrival);
  return slot;
}

void Scheduler::release(int32_t slot) {
  by_id_.erase(table_[slot].id);
  table_[slot] = Request{};
  free_slots_.push_back(slot);
}

int32_t Scheduler::finish(int64_t id) {
  int32_t slot;
  finish_many(&id, 1, &slot);
  return slot;
}

void Scheduler::check_unique(const int32_t* slots, int64_t n, const char* what) {
  scratch_slots_.assign(slots, slots + n);
  std::sort(scratch_slots_.begin(), scratch_slots_.end());
  for (size_t i = 1; i < scratch_slots_.size(); ++i)
    if (scratch_slots_[i] == scratch_slots_[i - 1])
      bad(std::string(what) + ": id " + std::to_string(table_[scratch_slots_[i]].id) + " appears twice");
}

void Scheduler::finish_many(const int64_t* ids, int64_t n, int32_t* slots_out) {
  // Validate all first so a bad batch changes nothing.
  for (int64_t i = 0; i < n; ++i) {
    const int32_t slot = lookup(ids[i], "finish");
    if (table_[slot].state != State::kRunning)
      bad("finish(id=" + std::to_string(ids[i]) + "): the request is not running (state " +
          std::to_string(static_cast<int32_t>(table_[slot].state)) + "); use cancel");
    slots_out[i] = slot;
  }
  check_unique(slots_out, n, "finish");
  for (int64_t i = 0; i < n; ++i) {
    remove_running(slots_out[i]);
    release(slots_out[i]);
  }
}

State Scheduler::cancel(int64_t id) {
  int32_t st;
  cancel_many(&id, 1, &st);
  return static_cast<State>(st);
}

void Scheduler::cancel_many(const int64_t* ids, int64_t n, int32_t* states_out) {
  // Validate all first (unknown or repeated ids) so a bad batch changes nothing.
  std::vector<int32_t> slots(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    slots[i] = lookup(ids[i], "cancel");
    states_out[i] = static_cast<int32_t>(table_[slots[i]].state);
  }
  check_unique(slots.data(), n, "cancel");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t slot = slots[i];
    const State st = table_[slot].state;
    if (st == State::kRunning) {
      remove_running(slot);
    } else {
      waiting_.remove(slot);
      if (st == State::kKept) kept_.remove(slot);
    }
    release(slot);
  }
}

void Scheduler::requeue_many(const int64_t* ids, const int32_t* generated, int64_t n, double now,
                             int32_t* states_out) {
  std::vector<int32_t> slots(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    slots[i] = lookup(ids[i], "requeue");
    const Request& r = table_[slots[i]];
    if (generated[i] < 0 || generated[i] > r.max_new)
      bad("requeue(id=" + std::to_string(ids[i]) + "): generated count " + std::to_string(generated[i]) +
          " outside [0, max_new_tokens=" + std::to_string(r.max_new) + "]");
  }
  check_unique(slots.data(), n, "requeue");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t slot = slots[i];
    Request& r = table_[slot];
    states_out[i] = static_cast<int32_t>(r.state);
    if (r.state == State::kRunning) {
      remove_running(slot);
    } else {
      waiting_.remove(slot);
      if (r.state == State::kKept) kept_.remove(slot);
    }
    r.gen = generated[i];
    r.ctx = 0;
    r.target = r.prompt_len + generated[i];
    r.resume = generated[i] > 0 ? kResumeRecompute : kResumeNone;
    r.state = State::kWaiting;
    r.touched = false;
    enqueue(slot, now);
  }
}

void Scheduler::set_predictions(const int32_t* slots, const float* values, int64_t n) {
  if (cfg_.policy != Policy::kTrail && cfg_.policy != Policy::kSjfPrompt)
    bad("set_predictions: only the trail and sjf_prompt policies order by predictions");
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = slots[i];
    if (s < 0 || s >= cfg_.max_slots || table_[s].state == State::kFree)
      bad("set_predictions: slot " + std::to_string(s) + " holds no request");
    if (!(std::isfinite(values[i]) && values[i] >= 0))
      bad("set_predictions: prediction " + std::to_string(values[i]) + " for slot " + std::to_string(s) +
          " is not a finite number >= 0");
  }
  for (int64_t i = 0; i < n; ++i) {
    const int32_t s = slots[i];
    Request& r = table_[s];
    r.key = values[i];
    if (cfg_.policy == Policy::kSjfPrompt || !r.started) {
      r.prompt_pred = r.key;
      if (!r.started) r.init = r.key;
    }
    if (r.state == State::kRunning) {
      if (!run_heaps_ok_) continue;
      if (pre_.contains(s)) pre_.update(s, run_key(r));
      else if (nonpre_.contains(s)) nonpre_.update(s, run_key(r));
    } else {
      r.s = wait_s(r);
      waiting_.update(s, wait_key(r));
      if (r.state == State::kKept) kept_.update(s, wait_key(r));
    }
  }
}

void Scheduler::enqueue(int32_t slot, double now) {
  Request& r = table_[slot];
  r.t_enq = now;
  r.k_enq = steps_;
  r.s = wait_s(r);
  waiting_.push(slot, wait_key(r));
  if (r.state == State::kKept) kept_.push(slot, wait_key(r));
}

void Scheduler::add_running(int32_t slot) {
  if (!run_heaps_ok_) return;  // the rebuild reads running_
  const Request& r = table_[slot];
  if (preemptible(r)) pre_.push(slot, run_key(r));
  else nonpre_.push(slot, run_key(r));
}

void Scheduler::ensure_run_heaps() {
  if (run_heaps_ok_) return;
  pre_.clear();
  nonpre_.clear();
  for (int32_t s : running_) {
    const Request& r = table_[s];
    if (r.touched) continue;  // admitted in this step: joins at the step's end (add_running)
    if (preemptible(r)) pre_.append_unordered(s, run_key(r));
    else nonpre_.append_unordered(s, run_key(r));
  }
  pre_.heapify();
  nonpre_.heapify();
  run_heaps_ok_ = true;
}

bool Scheduler::any_victim_above(double threshold) {
  if (!run_heaps_ok_) {  // a scan is cheaper than a rebuild when the answer is no (the steady state)
    bool any = false;
    for (int32_t s : running_) {
      const Request& r = table_[s];
      if (!r.touched && r.key > threshold && preemptible(r)) { any = true; break; }
    }
    if (!any) return false;
    ensure_run_heaps();
  }
  return !pre_.empty() && table_[pre_.top()].key > threshold;
}

void Scheduler::remove_running(int32_t slot) {
  if (run_heaps_ok_) {
    if (pre_.contains(slot)) pre_.remove(slot);
    else if (nonpre_.contains(slot)) nonpre_.remove(slot);
  }
  Request& r = table_[slot];
  const int32_t last = running_.back();
  running_[r.run_pos] = last;
  table_[last].run_pos = r.run_pos;
  running_.pop_back();
  r.run_pos = -1;
}

int32_t Scheduler::free_mode(const Request& r) {
  const int64_t n = r.ctx;
  if (n > 0 && cfg_.allow_swap && blocks(n) <= host_left_) {
    const double swap_s = 2.0 * static_cast<double>(n) * cfg_.bytes_per_token / (cfg_.pcie_gbps * 1e9);
    const double recompute_s = static_cast<double>(n) * cfg_.recompute_s_per_token;
    if (swap_s < recompute_s) return kModeSwap;
  }
  return kModeRecompute;
}

void Scheduler::drop_for_recompute(Request& r) {
  // A decoding request's newest token is not in its KV yet: the recompute prefill covers it too.
  if (r.ctx >= r.target) r.target = r.ctx + 1;
  r.ctx = 0;
  r.state = State::kWaiting;
  r.resume = kResumeRecompute;
}

void Scheduler::emit_preempt(int32_t slot, int32_t mode, bool forced, bool from_kept, int64_t blocks_held) {
  const int64_t row[kPreemptCols] = {table_[slot].id, slot, mode, forced ? 1 : 0, from_kept ? 1 : 0, blocks_held};
  out_.preempted.insert(out_.preempted.end(), row, row + kPreemptCols);
}

int64_t Scheduler::preempt_running(int32_t slot, int32_t mode, bool forced, double now) {
  Request& r = table_[slot];
  const int64_t held = blocks(r.ctx);
  emit_preempt(slot, mode, forced, false, held);
  remove_running(slot);
  r.preemptions += 1;
  if (forced) { r.forced += 1; r.forced_wait = true; } else { r.preempted_wait = true; }
  if (!r.touched) { r.touched = true; touched_.push_back(slot); }
  int64_t freed = held;
  if (mode == kModeKeep) {
    r.state = State::kKept;
    r.resume = kResumeKeep;
    freed = 0;
  } else if (mode == kModeSwap) {
    r.state = State::kSwapped;
    r.resume = kResumeSwapIn;
    host_left_ -= held;
  } else {
    drop_for_recompute(r);
  }
  enqueue(slot, now);
  return freed;
}

int64_t Scheduler::evict_kept(int32_t slot, bool forced) {
  Request& r = table_[slot];
  const int64_t held = blocks(r.ctx);
  const int32_t mode = free_mode(r);
  emit_preempt(slot, mode, forced, true, held);
  kept_.remove(slot);
  if (forced) {
    r.forced += 1;
    r.forced_wait = true;
    if (cfg_.resume_forced_first) {  // its waiting key moves to the front
      r.s = wait_s(r);
      waiting_.update(slot, wait_key(r));
    }
  }
  if (mode == kModeSwap) {
    r.state = State::kSwapped;
    r.resume = kResumeSwapIn;
    host_left_ -= held;
  } else {
    drop_for_recompute(r);
  }
  if (!r.touched) { r.touched = true; touched_.push_back(slot); }
  return held;
}

const StepOutput& Scheduler::step(const float* predictions, const int32_t* generated, int64_t free_gpu_blocks,
                                  int64_t free_host_blocks, double now) {
  if (free_gpu_blocks < 0 || free_host_blocks < 0)
    bad("step: free block counts must be >= 0, got gpu " + std::to_string(free_gpu_blocks) + ", host " +
        std::to_string(free_host_blocks));
  if (!std::isfinite(now)) bad("step: now must be finite");
  const bool trail = cfg_.policy == Policy::kTrail;
  for (int32_t s : running_) {  // validate all first (no message built unless one is bad)
    const Request& r = table_[s];
    const int32_t g = generated[s];
    if (g < r.gen) bad_running(s, "below", g, static_cast<double>(r.gen));
    if (g > r.max_new) bad_running(s, "above", g, static_cast<double>(r.max_new));
    if (trail && r.ctx >= r.target && !(std::isfinite(predictions[s]) && predictions[s] >= 0))
      bad_running(s, "prediction", predictions[s], 0);
  }

  out_.scheduled.clear();
  out_.preempted.clear();
  out_.stop_reason = kStopEmpty;
  for (int32_t s : touched_) table_[s].touched = false;
  touched_.clear();
  admitted_.clear();
  deferred_.clear();
  peak_valid_ = false;
  host_left_ = free_host_blocks;

  // (1) refresh keys of the running requests (pre_ / nonpre_ are rebuilt when next read).
  run_heaps_ok_ = false;
  for (int32_t s : running_) {
    Request& r = table_[s];
    r.gen = generated[s];
    if (trail) {
      if (r.ctx >= r.target) {
        r.key = predictions[s];
        if (r.init_pending) {
          r.init = static_cast<double>(r.gen) + r.key;
          r.init_pending = false;
        }
      }
    } else if (cfg_.policy == Policy::kOracle) {
      r.key = static_cast<double>(std::max<int64_t>(r.true_total - r.gen, 0));
    }
  }

  // (2) plan the running requests: decodes first, then prefill chunks in key order.
  int64_t tokens_left = cfg_.max_tokens_per_step;
  int64_t gpu_left = free_gpu_blocks;
  prefillers_.clear();
  for (int32_t s : running_) {
    Request& r = table_[s];
    if (r.ctx >= r.target) {
      r.plan_tokens = 1;
      r.plan_need = blocks(r.ctx + 1) - blocks(r.ctx);
      tokens_left -= 1;
      gpu_left -= r.plan_need;
    } else {
      prefillers_.push_back(s);
    }
  }
  std::sort(prefillers_.begin(), prefillers_.end(),
            [this](int32_t a, int32_t b) { return key_less(run_key(table_[a]), run_key(table_[b])); });
  for (int32_t s : prefillers_) {
    Request& r = table_[s];
    r.plan_tokens = std::min({r.target - r.ctx, std::max<int64_t>(tokens_left, 0), cfg_.max_prefill_chunk});
    r.plan_need = blocks(r.ctx + r.plan_tokens) - blocks(r.ctx);
    tokens_left -= r.plan_tokens;
    gpu_left -= r.plan_need;
  }

  // (3) memory always wins.
  while (gpu_left < cfg_.watermark_blocks) {
    if (!kept_.empty()) {
      gpu_left += evict_kept(kept_.top(), true);
      continue;
    }
    ensure_run_heaps();
    const int32_t v = forced_victim();
    if (v < 0) break;
    const Request& r = table_[v];
    tokens_left += r.plan_tokens;
    gpu_left += r.plan_need;
    gpu_left += preempt_running(v, free_mode(r), true, now);
  }

  // (4) admission in key order, with limited preemption.
  while (!waiting_.empty()) {
    const int32_t h = waiting_.top();
    Request& r = table_[h];
    if (r.touched) {
      waiting_.pop();
      deferred_.push_back(h);
      continue;
    }
    const bool prefill = r.ctx < r.target;
    const int64_t t = prefill ? std::min({r.target - r.ctx, std::max<int64_t>(tokens_left, 0), cfg_.max_prefill_chunk})
                              : (tokens_left >= 1 ? 1 : 0);
    const int64_t swap_in = r.state == State::kSwapped ? blocks(r.ctx) : 0;
    const int64_t need = blocks(r.ctx + t) - blocks(r.ctx) + swap_in;
    bool mem_short = gpu_left - need < cfg_.watermark_blocks;
    int32_t lack = -1;
    if (static_cast<int32_t>(running_.size()) >= cfg_.max_batch) lack = kStopBatch;
    else if (t < 1) lack = kStopTokens;
    else if (mem_short) lack = kStopMemory;
    else if (cfg_.admit_reserve > 0 && !running_.empty() &&
             (cfg_.reserve_free_frac >= 1 ||
              static_cast<double>(gpu_left - need) < cfg_.reserve_free_frac * static_cast<double>(cfg_.num_gpu_blocks)) &&
             !reserve_fits(h, t, gpu_left - need)) {
      mem_short = true;
      lack = kStopMemory;
    }
    if (lack < 0) {
      waiting_.pop();
      if (r.state == State::kKept) kept_.remove(h);
      r.waited += now - r.t_enq;
      r.kwaited += steps_ - r.k_enq;
      r.state = State::kRunning;
      r.started = true;
      r.forced_wait = false;
      r.preempted_wait = false;
      if (!r.touched) { r.touched = true; touched_.push_back(h); }
      r.plan_tokens = t;
      r.plan_need = need;
      r.run_pos = static_cast<int32_t>(running_.size());
      running_.push_back(h);
      admitted_.push_back(h);
      if (peak_valid_) peak_insert(h);
      tokens_left -= t;
      gpu_left -= need;
      continue;
    }
    if (mem_short && !kept_.empty() && kept_.top() != h && !table_[kept_.top()].touched) {
      gpu_left += evict_kept(kept_.top(), false);
      continue;
    }
    if (cfg_.c > 0 && !at_front(r) && (cfg_.memory_preemption || !mem_short) &&
        any_victim_above(r.key + cfg_.margin)) {
      const int32_t v = pre_.top();
      const Request& vr = table_[v];
      if (vr.key > r.key + cfg_.margin) {  // raw keys: aging never preempts
        const int32_t mode = (mem_short || !cfg_.allow_keep) ? free_mode(vr) : kModeKeep;
        if (peak_valid_) peak_remove(v);
        tokens_left += vr.plan_tokens;
        gpu_left += vr.plan_need;
        gpu_left += preempt_running(v, mode, false, now);
        continue;
      }
    }
    out_.stop_reason = lack;
    break;
  }

  // (5) emit the batch and advance the KV token counts (the engine runs it before the next step).
  out_.scheduled.resize(running_.size() * kSchedCols);
  int64_t* row = out_.scheduled.data();
  for (int32_t s : running_) {
    Request& r = table_[s];
    if (r.plan_tokens <= 0) continue;
    const bool prefill = r.ctx < r.target;
    const bool last = prefill && r.ctx + r.plan_tokens == r.target;
    int64_t flags = prefill ? kFlagPrefill : kFlagSample;
    if (prefill) {
      if (r.ctx == 0) flags |= kFlagFirstChunk;
      if (last) flags |= kFlagLastChunk | kFlagSample;
      if (r.target > r.prompt_len) flags |= kFlagRecompute;  // only a recompute extends the target
    }
    row[kSId] = r.id;
    row[kSSlot] = s;
    row[kSKind] = prefill ? kPrefill : kDecode;
    row[kSTokens] = r.plan_tokens;
    row[kSCtxStart] = r.ctx;
    row[kSBlocks] = blocks(r.ctx + r.plan_tokens);
    row[kSResume] = r.resume;
    row[kSLastChunk] = last ? 1 : 0;
    row[kSFlags] = flags;
    row += kSchedCols;
    r.ctx += r.plan_tokens;
    r.resume = kResumeNone;
  }
  out_.scheduled.resize(static_cast<size_t>(row - out_.scheduled.data()));
  for (int32_t s : admitted_) add_running(s);
  for (int32_t s : deferred_) waiting_.push(s, wait_key(table_[s]));
  ++steps_;
  return out_;
}

std::vector<double> Scheduler::snapshot() const {
  std::vector<double> rows;
  rows.reserve(by_id_.size() * kSnapCols);
  for (int32_t s = 0; s < cfg_.max_slots; ++s) {
    const Request& r = table_[s];
    if (r.state == State::kFree) continue;
    const double row[kSnapCols] = {static_cast<double>(r.id), static_cast<double>(s),
                                   static_cast<double>(static_cast<int32_t>(r.state)), static_cast<double>(r.ctx),
                                   static_cast<double>(r.target), static_cast<double>(r.gen),
                                   static_cast<double>(r.preemptions), r.key, r.init,
                                   static_cast<double>(r.resume)};
    rows.insert(rows.end(), row, row + kSnapCols);
  }
  return rows;
}

}  // namespace trail::sched
