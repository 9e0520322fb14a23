"""Run one greedy generation in a fresh vLLM engine process; print the result as JSON.

Used by the tests to prove that KV stored by one engine process is found by another one,
with PYTHONHASHSEED unset in both. Usage:
    python engine_probe.py MODEL_DIR DAEMON_CONFIG PROMPT_SEED
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from vllm_harness import Engine, connector_config, make_prompt, shutdown_engine, start_engine

if __name__ == "__main__":  # vLLM's engine processes re-import this module
    model, config, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    llm = start_engine(model, connector_config(config))
    try:
        out = Engine(llm, None).generate(make_prompt(seed))
        result = {
            "token_ids": list(out.outputs[0].token_ids),
            "num_cached_tokens": out.num_cached_tokens,
        }
    finally:
        shutdown_engine(llm)
    print("PROBE " + json.dumps(result), flush=True)
