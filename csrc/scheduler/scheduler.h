// The policy core: a request table indexed by slot, indexed heaps for the waiting queue and the
// running / kept sets, and one policy step per engine step (DESIGN.md "Policy").
//
// Slots: the scheduler assigns each request a slot in [0, max_slots) at add() (LIFO free list:
// 0, 1, 2, ... at first, then the most recently freed slot) and frees it at finish() / cancel().
// Per-slot arrays from the GPU (predicted remaining length, generated counts) use that slot.
// Preemptions counted against max_preemptions are all preemptions of a running request (policy
// and forced); the policy stops preempting a request at the cap, memory never does.
//
// Contract with the engine: each step's decisions are executed before the next step() call
// (prefill chunks and decodes ran, blocks allocated / swapped / freed as the rows say). Swap-outs
// of a step must be ordered before that step's forward pass: their GPU blocks are counted as
// free for the step's admissions. KV tokens of a decoding request = prompt + generated - 1 (the
// newest sampled token is written by the next decode); the scheduler tracks this itself.
// Plain C++17, no torch types.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "scheduler/indexed_heap.h"

namespace trail::sched {

enum class Policy : int32_t { kFcfs = 0, kSjfPrompt = 1, kTrail = 2, kOracle = 3 };

// Request states as cancel() reports them (what the engine must free).
enum class State : int32_t { kFree = 0, kWaiting = 1, kRunning = 2, kKept = 3, kSwapped = 4 };

enum Kind : int32_t { kDecode = 0, kPrefill = 1 };
enum Resume : int32_t { kResumeNone = 0, kResumeKeep = 1, kResumeSwapIn = 2, kResumeRecompute = 3 };
enum Mode : int32_t { kModeKeep = 1, kModeSwap = 2, kModeRecompute = 3 };

// Row flags (the same values as trail_kernels/row_flags.py): the plan's kSFlags column, read by
// the model runner and the probe kernel. A recompute is marked on every chunk of it.
enum RowFlag : int32_t {
  kFlagPrefill = 1, kFlagFirstChunk = 2, kFlagLastChunk = 4, kFlagRecompute = 8, kFlagSample = 16
};
// Columns of the scheduled rows (int64, row-major, kSchedCols per row).
enum SchedCol : int32_t {
  kSId = 0, kSSlot, kSKind, kSTokens, kSCtxStart, kSBlocks, kSResume, kSLastChunk, kSFlags, kSchedCols
};
// Columns of the preempted rows.
enum PreemptCol : int32_t { kPId = 0, kPSlot, kPMode, kPForced, kPFromKept, kPBlocks, kPreemptCols };
// Columns of snapshot() rows (double).
enum SnapCol : int32_t {
  kXId = 0, kXSlot, kXState, kXCtx, kXTarget, kXGenerated, kXPreemptions, kXKey, kXInit, kXResume,
  kSnapCols
};
// Why admission stopped in the last step (for tests and logs).
enum Stop : int32_t { kStopEmpty = 0, kStopBatch = 1, kStopTokens = 2, kStopMemory = 3 };

struct Config {
  Policy policy = Policy::kTrail;
  int32_t max_slots = 1024;
  int32_t max_batch = 256;
  int64_t max_tokens_per_step = 8192;
  int64_t max_prefill_chunk = 8192;
  int32_t block_size = 16;
  int64_t num_gpu_blocks = 1 << 20;
  int64_t num_host_blocks = 0;
  int64_t watermark_blocks = 0;
  double c = 0.8;                    // preemptible iff c > 0 and generated < c * initial_prediction
  // Tokens by which a victim's key must exceed the newcomer's for a policy preemption. Raw keys:
  // aging orders the queue but never makes a preemption (ties within the margin never preempt).
  double margin = 0.0;
  int32_t max_preemptions = 4;       // per request; policy preemptions stop at this count
  // Aging of the waiting key (admission order only): key - aging_rate x seconds waited -
  // aging_per_step x steps waited (a step waited = a step() call that left it waiting; both summed
  // over all its waits). aging_per_step means the same at any step time; aging_rate does not.
  double aging_rate = 0.0;           // tokens of key per second waited
  double aging_per_step = 0.0;       // tokens of key per step waited
  bool allow_keep = true;
  bool allow_swap = true;
  double bytes_per_token = 0.0;      // KV bytes of one token, all layers
  double pcie_gbps = 25.0;           // GB/s one way
  double recompute_s_per_token = 0.0;
  // Memory-aware admission (0: off). A request is admitted only if the predicted peak KV of the
  // running set plus it fits the GPU blocks the running set may use, each request assumed to run
  // min(max_new - generated, ceil(admit_reserve * predicted remaining)) more tokens (the factor is
  // the margin for prediction error). Skipped when nothing runs (no deadlock).
  double admit_reserve = 0.0;
  // The reserve applies only under memory pressure: while the GPU blocks free after the admission
  // would be below reserve_free_frac x num_gpu_blocks (1: always; 0: never).
  double reserve_free_frac = 1.0;
  // Forced evictions: victims with fewer than this many forced evictions are chosen first (0: no
  // bound); memory still wins when every running request is at the bound.
  int32_t max_forced_evictions = 0;
  // Forced victim = the largest (predicted remaining - evict_kv_weight * KV tokens held): long
  // requests that hold little KV go first (cheap to swap or recompute, little work lost; the one
  // furthest along keeps running, so recompute cannot livelock). With both this and
  // max_forced_evictions at 0 the victim is the policy-preemptible request with the largest key,
  // else any running request with the largest key (TRAIL's rule).
  double evict_kv_weight = 0.0;
  // A request evicted by force waits at the front of the queue (arrival order among such) and
  // never preempts by policy, so its swapped copy does not rot in host memory.
  bool resume_forced_first = false;
  bool resume_preempted_first = false;  // policy victims wait at the queue's front too
  // When KV is short (or the admission reserve fails), may the policy preempt a running request
  // (by swap / recompute) to admit a shorter one? false: only when the batch cap or the token
  // budget binds (then the victim is kept on the GPU), so memory pressure never causes policy
  // swaps or recomputes.
  bool memory_preemption = true;

  void validate() const;  // throws std::invalid_argument naming the field
};

struct StepOutput {
  std::vector<int64_t> scheduled;  // rows of kSchedCols
  std::vector<int64_t> preempted;  // rows of kPreemptCols
  int32_t stop_reason = kStopEmpty;
  int64_t num_scheduled() const { return static_cast<int64_t>(scheduled.size()) / kSchedCols; }
  int64_t num_preempted() const { return static_cast<int64_t>(preempted.size()) / kPreemptCols; }
};

class Scheduler {
 public:
  explicit Scheduler(const Config& config);

  // Returns the slot assigned. true_length < 0: unknown (required by the oracle policy).
  int32_t add(int64_t id, double arrival, int64_t prompt_len, int64_t max_new_tokens,
              double prompt_prediction, int64_t true_length);
  // Batched add: validates every request first (nothing is added if one is bad).
  void add_many(const int64_t* ids, const double* arrivals, const int64_t* prompt_lens,
                const int64_t* max_new_tokens, const double* prompt_predictions, const int64_t* true_lengths,
                int64_t n, int32_t* slots_out);
  // A running request ended (stop token or length). Returns its slot, now free.
  int32_t finish(int64_t id);
  void finish_many(const int64_t* ids, int64_t n, int32_t* slots_out);  // all or nothing
  // Removes a request in any state. Returns the state it was in (what the engine must free).
  State cancel(int64_t id);
  void cancel_many(const int64_t* ids, int64_t n, int32_t* states_out);  // all or nothing
  // A step's work was lost (an exception between step() and the end of its execution): each
  // request goes back to waiting holding no KV, to be prefilled again over its prompt and its
  // first generated[i] output tokens (the outputs the engine has confirmed); with generated[i] > 0
  // that is a recompute. Its preemption counts, initial prediction and arrival are kept. All or
  // nothing (unknown or repeated ids, generated outside [0, max_new_tokens] change nothing).
  // states_out: the state each request was in (what the engine must free).
  void requeue_many(const int64_t* ids, const int32_t* generated, int64_t n, double now, int32_t* states_out);
  // New predicted remaining lengths for any requests (trail / sjf_prompt): waiting keys move.
  void set_predictions(const int32_t* slots, const float* values, int64_t n);

  // One policy step. predictions / generated: [max_slots], indexed by slot (read for running
  // requests only). Rejected (std::invalid_argument, nothing changed): a prediction that is NaN,
  // infinite or negative (trail, once the request's prefill is done), a generated count that is
  // negative, exceeds the request's max_new_tokens, or is below the count read last step. The returned reference stays valid until the next step().
  const StepOutput& step(const float* predictions, const int32_t* generated, int64_t free_gpu_blocks,
                         int64_t free_host_blocks, double now);

  const Config& config() const { return cfg_; }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_active() const { return static_cast<int64_t>(by_id_.size()); }
  int32_t last_stop_reason() const { return out_.stop_reason; }
  int32_t slot_of(int64_t id) const;
  State state_of(int64_t id) const;
  // One row of kSnapCols per active request, in slot order.
  std::vector<double> snapshot() const;

 private:
  struct Request {
    int64_t id = -1;
    double arrival = 0;
    int64_t prompt_len = 0;
    int64_t max_new = 0;
    int64_t true_total = -1;
    double prompt_pred = 0;
    State state = State::kFree;
    int32_t resume = kResumeNone;  // how the next admission resumes it
    bool started = false;          // ever admitted
    bool init_pending = false;     // trail: initial_prediction not yet read after prefill
    bool touched = false;          // preempted or admitted in the current step
    int64_t ctx = 0;               // tokens in its KV (GPU or host) after the last step ran
    int64_t target = 0;            // prefill target: prompt (+ generated, after a recompute drop)
    int32_t gen = 0;               // generated count, last read
    int32_t preemptions = 0;
    int32_t forced = 0;            // forced evictions so far
    bool forced_wait = false;      // waiting after a forced eviction
    bool preempted_wait = false;   // waiting after a policy preemption
    double key = 0;                // remaining estimate (arrival for fcfs)
    double init = 0;               // initial prediction (c rule)
    double waited = 0;             // seconds waited before the current wait
    double t_enq = 0;              // start of the current wait
    int64_t kwaited = 0;           // steps waited before the current wait
    int64_t k_enq = 0;             // steps_ at the start of the current wait
    double s = 0;                  // waiting key with aging folded in
    int64_t plan_tokens = 0;
    int64_t plan_need = 0;         // new GPU blocks of this step's plan
    int32_t run_pos = -1;          // index in running_
  };

  int64_t blocks(int64_t tokens) const { return (tokens + cfg_.block_size - 1) / cfg_.block_size; }
  bool preemptible(const Request& r) const;
  double wait_s(const Request& r) const;             // waiting key with aging / resume-first folded in
  double pred_remaining(const Request& r) const;     // predicted remaining output tokens
  // Memory-aware admission: does the predicted peak of running_ (+ h with t tokens this step) fit?
  bool reserve_fits(int32_t h, int64_t t, int64_t gpu_left);
  int32_t forced_victim() const;                     // -1 when nothing runs
  HeapKey run_key(const Request& r) const { return HeapKey{r.key, r.arrival, r.id}; }
  HeapKey wait_key(const Request& r) const { return HeapKey{r.s, r.arrival, r.id}; }
  // pre_ / nonpre_ are rebuilt (O(n) heapify) at their first use in a step after the running keys
  // moved, not updated one key at a time: in a steady decode step nothing reads them.
  void ensure_run_heaps();
  // Is some policy-preemptible running request (not admitted this step) keyed above threshold?
  bool any_victim_above(double threshold);
  [[noreturn]] void bad_running(int32_t s, const char* what, double value, double bound) const;
  int32_t lookup(int64_t id, const char* what) const;
  void check_add(int64_t id, double arrival, int64_t prompt_len, int64_t max_new_tokens, double prompt_prediction,
                 int64_t true_length) const;
  int32_t add_unchecked(int64_t id, double arrival, int64_t prompt_len, int64_t max_new_tokens,
                        double prompt_prediction, int64_t true_length);
  void check_unique(const int32_t* slots, int64_t n, const char* what);

  void enqueue(int32_t slot, double now);            // into waiting_ (and kept_ when kKept)
  void add_running(int32_t slot);                    // running_ + preemptible/non-preemptible heap
  void remove_running(int32_t slot);
  int32_t free_mode(const Request& r);               // swap or recompute, by the cost model
  // Takes a running request off the GPU (mode keep / swap / recompute); returns blocks freed.
  int64_t preempt_running(int32_t slot, int32_t mode, bool forced, double now);
  bool at_front(const Request& r) const;             // waits at the queue's front (resume_*_first)
  int64_t evict_kept(int32_t slot, bool forced);     // kept -> swapped / dropped
  void drop_for_recompute(Request& r);
  void emit_preempt(int32_t slot, int32_t mode, bool forced, bool from_kept, int64_t blocks_held);
  void release(int32_t slot);

  Config cfg_;
  std::vector<Request> table_;
  std::vector<int32_t> free_slots_;
  std::unordered_map<int64_t, int32_t> by_id_;
  IndexedHeap<false> waiting_;   // all not-running requests, min (s, arrival, id)
  IndexedHeap<true> kept_;       // kept-on-GPU preempted requests, max (s, arrival, id)
  IndexedHeap<true> pre_;        // running, preemptible by the policy, max (key, arrival, id)
  IndexedHeap<true> nonpre_;     // running, not preemptible, max (key, arrival, id)
  bool run_heaps_ok_ = true;     // pre_ / nonpre_ match running_'s keys (else rebuilt when read)
  int64_t steps_ = 0;            // completed step() calls (aging_per_step)
  std::vector<int32_t> running_;
  // step scratch
  std::vector<int32_t> prefillers_, admitted_, touched_, deferred_, scratch_slots_;
  // Memory-aware admission: (reserved tokens, base tokens) of the running set, sorted by reserved
  // tokens (descending), built at the first check of a step, kept sorted on admissions and policy
  // preemptions; peak_held_ = blocks the running set holds after this step.
  std::vector<std::pair<int64_t, int64_t>> peak_;
  bool peak_valid_ = false;
  int64_t peak_held_ = 0;
  std::pair<int64_t, int64_t> peak_entry(const Request& r, int64_t tokens) const;
  void peak_insert(int32_t slot);
  void peak_remove(int32_t slot);  // before the running request leaves (its plan still set)
  int64_t host_left_ = 0;
  StepOutput out_;
};

}  // namespace trail::sched
