"""Row flags of one engine step, defined once: the scheduler's plan carries them (column FLAGS,
csrc/scheduler/scheduler.h mirrors these values), the model runner reads them to decide which rows
sample, and the probe kernel reads them to pool, update or skip a row.

    SAMPLE alone             a decode row (one token; samples)
    PREFILL                  a prompt chunk (or a chunk of a recompute)
    FIRST_CHUNK              the chunk starts at position 0 (the slot's pooled prompt sum restarts)
    LAST_CHUNK               the chunk reaches the prefill target (the probe reads the prompt mean)
    RECOMPUTE                every chunk of a re-prefill of prompt + generated tokens after a
                             drop: the probe leaves the slot's posterior and prompt mean untouched
    SAMPLE                   the row draws a next token (decodes and last chunks)
"""
PREFILL = 1
FIRST_CHUNK = 2
LAST_CHUNK = 4
RECOMPUTE = 8
SAMPLE = 16
ALL = PREFILL | FIRST_CHUNK | LAST_CHUNK | RECOMPUTE | SAMPLE
