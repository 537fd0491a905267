"""The engine's per-slot host state: the tokens, lengths and stop rules of the request bound to
each slot, as numpy arrays so a step's plan is applied over its columns with no per-request Python
(slots come from the scheduler at add and stay until finish). Also the serial of each slot's
request (the id the scheduler knows it by: never reused, so a token in flight for a finished or
aborted request can never be taken for the next request in its slot) and the tokens in flight.

    table.bind(slot, serial, request, prompt_ids, max_new, stop_len, ignore_eos, custom_stop)
    plan = table.batch_plan(rows)          # the plan's rows -> the runner's BatchPlan
    table.mark_in_flight(sampled_rows, step)
    rows = rows[table.live(rows)]          # requests that still hold their slot
    fed, eos, length = table.commit(rows[:, SCHED.SLOT], tokens)   # the step's tokens appended
    table.unbind(slot)

Host truth of a request's output is `tokens[slot, prompt_len:seq_len]` and `gen[slot]` (outputs
the host has seen, the counts the scheduler reads); a lost step never advanced them.
"""
from __future__ import annotations

import numpy as np
import torch

from trail.batch import BatchPlan
from trail.scheduler import SCHED
from trail_kernels import row_flags


class SlotTable:
    def __init__(self, max_slots: int, max_model_len: int, eos_lookup: np.ndarray):
        n = max_slots
        self.tokens = np.zeros((n, max_model_len + 1), np.int64)   # prompt + output ids
        self.seq_len = np.zeros(n, np.int64)
        self.prompt_len = np.zeros(n, np.int64)
        self.max_new = np.zeros(n, np.int64)
        self.stop_len = np.zeros(n, np.int64)          # max_new_tokens, or the replayed length
        self.ignore_eos = np.zeros(n, bool)
        self.custom_stop = np.zeros(n, bool)           # stop ids beyond EOS, or stop strings
        self.serial = np.full(n, -1, np.int64)         # scheduler id of the slot's request (-1: free)
        self.pending = np.full(n, -1, np.int64)        # serial whose token is in flight, by slot,
        self.pending_step = np.full(n, -1, np.int64)   # and the step drawing it
        self.req: list = [None] * n
        self.gen_host = torch.zeros(n, dtype=torch.int32)  # generated counts, as the scheduler reads them
        self.gen = self.gen_host.numpy()
        self.is_eos = eos_lookup

    def bind(self, slot: int, serial: int, request, prompt_ids, max_new: int, stop_len: int, ignore_eos: bool,
             custom_stop: bool) -> None:
        n = len(prompt_ids)
        self.tokens[slot, :n] = prompt_ids
        self.seq_len[slot] = self.prompt_len[slot] = n
        self.max_new[slot], self.stop_len[slot] = max_new, stop_len
        self.ignore_eos[slot], self.custom_stop[slot] = ignore_eos, custom_stop
        self.serial[slot], self.req[slot] = serial, request
        self.gen[slot] = 0

    def unbind(self, slot: int) -> None:
        self.serial[slot] = -1
        self.req[slot] = None

    def output_ids(self, slot: int, start: int = 0) -> list[int]:
        return self.tokens[slot, self.prompt_len[slot] + start:self.seq_len[slot]].tolist()

    def batch_plan(self, rows: np.ndarray, step_index: int) -> BatchPlan:
        """The plan's rows as the runner's BatchPlan. A decode row's token is the slot's last
        sampled token, which the runner reads on the device (-1 here): with overlap the host has
        not seen it yet."""
        slots, starts, ntok, flags = (rows[:, SCHED.SLOT], rows[:, SCHED.CTX_START], rows[:, SCHED.TOKENS],
                                      rows[:, SCHED.FLAGS])
        cu = np.zeros(len(rows) + 1, np.int64)
        np.cumsum(ntok, out=cu[1:])
        positions = np.repeat(starts - cu[:-1], ntok) + np.arange(cu[-1])
        prefill = (flags & row_flags.PREFILL) != 0
        unknown = prefill & (starts + ntok > self.seq_len[slots])
        if unknown.any():      # a recompute re-feeding a token still in flight: never planned so
            raise RuntimeError(f"step {step_index}: prefill rows of requests {rows[unknown, SCHED.ID].tolist()} "
                               f"need tokens the host has not seen yet")
        token_ids = np.where(np.repeat(prefill, ntok), self.tokens[np.repeat(slots, ntok), positions], -1)
        # the probe's count: output tokens fed up to this row (0 for a prompt chunk)
        gen = self.gen[slots].astype(np.int64) + (self.pending[slots] == rows[:, SCHED.ID])
        num_generated = np.where(prefill, np.where((flags & row_flags.RECOMPUTE) != 0, gen, 0), gen)
        return BatchPlan(slots, flags, starts, ntok, token_ids, num_generated, self.max_new[slots])

    def drop_finishing(self, rows: np.ndarray) -> np.ndarray:
        """Sampling rows of requests whose token in flight is their last (they reach their length
        when that step completes; only with overlap) are not run."""
        if not len(rows):
            return rows
        slots = rows[:, SCHED.SLOT]
        finishing = ((self.pending[slots] == rows[:, SCHED.ID]) & (self.gen[slots] + 1 >= self.stop_len[slots])
                     & ((rows[:, SCHED.FLAGS] & row_flags.SAMPLE) != 0))
        return rows[~finishing] if finishing.any() else rows

    def mark_in_flight(self, sampled_rows: np.ndarray, step_index: int) -> None:
        slots = sampled_rows[:, SCHED.SLOT]
        self.pending[slots] = sampled_rows[:, SCHED.ID]
        self.pending_step[slots] = step_index

    def clear_in_flight(self, sampled_rows: np.ndarray | None = None, step_index: int | None = None) -> None:
        """The step's tokens arrived (or, with no arguments, every step in flight was lost)."""
        if sampled_rows is None:
            self.pending[:] = -1
            return
        slots = sampled_rows[:, SCHED.SLOT]
        self.pending[slots[self.pending_step[slots] == step_index]] = -1

    def live(self, rows: np.ndarray) -> np.ndarray:
        """Rows whose request still holds its slot (with overlap, one may have finished or been
        aborted since the step launched; serials are never reused)."""
        return self.serial[rows[:, SCHED.SLOT]] == rows[:, SCHED.ID]

    def commit(self, slots: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Appends one token per slot. -> (output tokens fed before it, EOS hit, length reached)."""
        fed = self.gen[slots].astype(np.int64)
        self.tokens[slots, self.seq_len[slots]] = tokens
        self.seq_len[slots] += 1
        self.gen[slots] += 1
        eos = self.is_eos[tokens] & ~self.ignore_eos[slots]
        return fed, eos, self.gen[slots] >= self.stop_len[slots]
