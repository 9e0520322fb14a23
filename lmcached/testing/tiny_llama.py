"""Build small random-weight Llama checkpoints offline, for the vLLM tests and benchmark.

The model hub cannot be reached from CI, so the checkpoint is made here: a transformers
``LlamaConfig`` with seeded random weights (head_dim 64, as real Llamas have), saved with
``save_pretrained``, plus a byte-level BPE tokenizer trained with ``tokenizers`` on text that
is generated from a fixed seed. Prompts are passed to vLLM as token ids, so the tokenizer only
has to exist and load; the weights only have to be fixed, so that two runs agree.

A checkpoint is built once into ``<cache>/models/<name>-<spec hash>`` (under a file lock,
written to a temp folder and renamed) and reused by every later test session.

Needs torch, transformers and tokenizers: run it inside the vLLM environment
(``scripts/vllm_env.sh``), never in the daemon.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

# Bump when the build recipe changes, so that old cached checkpoints are not reused.
_RECIPE_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Shape and dtype of a random Llama checkpoint."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    dtype: str = "float32"
    max_position_embeddings: int = 4096
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# About 4.5M parameters: a generate() on a 2k-token prompt takes well under a second on CPU.
TINY = ModelSpec(
    name="tiny-llama",
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=512,
    vocab_size=4096,
)

# About 110M parameters: a 2048-token prefill costs most of a second, good for TTFT figures.
BENCH_100M = ModelSpec(
    name="llama-100m",
    hidden_size=1024,
    num_layers=8,
    num_heads=16,
    num_kv_heads=4,
    intermediate_size=2816,
    vocab_size=8192,
    dtype="bfloat16",
)


# About 25M parameters, float32 (this project's CPUs have no AVX-512/AMX: bf16 is emulated and
# slow). A 2048-token prefill takes about 3 s on one core: the side-by-side TTFT benchmark's model.
# Its KV is 16 KiB per token (8 layers x 4 KV heads x 64 x K,V x 4 bytes): 32 MiB per 2048 tokens.
BENCH_25M = ModelSpec(
    name="llama-25m",
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    intermediate_size=1280,
    vocab_size=4096,
    dtype="float32",
)


def default_cache_dir() -> Path:
    """Return the folder that holds built checkpoints (outside any clone)."""
    base = os.environ.get("LMCACHED_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lmcached"
    )
    return Path(base) / "models"


def spec_hash(spec: ModelSpec) -> str:
    """Return a short hash of the spec and the recipe version (the cache folder's suffix)."""
    blob = json.dumps([_RECIPE_VERSION, dataclasses.asdict(spec)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def ensure_model(spec: ModelSpec = TINY, cache_dir: Path | None = None) -> Path:
    """Return the folder of the checkpoint for ``spec``, building it first if it is missing."""
    root = cache_dir or default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{spec.name}-{spec_hash(spec)}"
    if (target / "config.json").exists():
        return target
    with open(root / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building it right now
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
            try:
                _build(spec, tmp)
                os.rename(tmp, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    """Return deterministic English-like text for training the tokenizer."""
    rng = random.Random(seed)
    text = (
        "the a cache key value block chunk token model layer head prefix daemon store load "
        "save hit miss memory disk remote worker scheduler request engine prompt output "
        "of to in on for with from by and or not is are was be has have will can fast slow "
        "first last next new old small large one two three four five six seven eight nine"
    )
    words = text.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) for _ in range(lines)]


def _build(spec: ModelSpec, out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(spec.vocab_size, 1024),
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(out)

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)
    # Random weights: give every checkpoint a distinct fingerprint that the connector's
    # automatic revision picks up (it hashes config.json and the weight files' sizes).
    (out / "lmcached_spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=1))


if __name__ == "__main__":
    import sys

    chosen = {"tiny": TINY, "25m": BENCH_25M, "100m": BENCH_100M}[
        sys.argv[1] if len(sys.argv) > 1 else "tiny"
    ]
    print(ensure_model(chosen))
