"""`random:mistral-7b`: Mistral-7B-Instruct-v0.2's architecture with random weights.

For GPU machines without hub access: the same shapes, FLOPs and memory as the real checkpoint,
built once (bf16 safetensors, about 14.5 GB, about half a minute on an H100) into the cache folder
and then loaded like any local checkpoint, 4-bit included. Usable wherever a model name is:
`--set model.name_or_path=random:mistral-7b`, `mistral-qlora bench --model random:mistral-7b`.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

RANDOM_7B = "random:mistral-7b"
RANDOM_7B_SEED = 0
# Mistral-7B-Instruct-v0.2's config.json, less the weights.
MISTRAL_7B_V02 = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    sliding_window=None,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
)


def random_7b_dir(model_dir: str | Path | None = None) -> Path:
    from mistral_qlora.modeling.tiny import cache_root

    return Path(model_dir) if model_dir else cache_root() / "random-mistral-7b-instruct-v0.2-arch"


def build_random_7b(directory: Path, arch: dict = MISTRAL_7B_V02) -> None:
    """Random bf16 weights from a fixed seed, built directly on the GPU where there is one."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_qlora.modeling.tokenizer import write_mistral_v1_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    started = time.time()
    print(f"mistral-qlora: building {RANDOM_7B} (random weights) on {device} ...", file=sys.stderr, flush=True)
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.bfloat16)
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(RANDOM_7B_SEED)
            if device == "cuda":
                torch.cuda.manual_seed(RANDOM_7B_SEED)
            model = MistralForCausalLM(MistralConfig(**arch))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(directory, max_shard_size="5GB")
    write_mistral_v1_tokenizer(directory)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    print(f"mistral-qlora: built {RANDOM_7B} in {time.time() - started:.0f} s", file=sys.stderr, flush=True)


def ensure_random_7b(model_dir: str | Path | None = None, arch: dict = MISTRAL_7B_V02) -> Path:
    """The checkpoint's folder, built on first use."""
    from mistral_qlora.modeling.tiny import build_once

    return build_once(random_7b_dir(model_dir), lambda folder: build_random_7b(folder, arch))
