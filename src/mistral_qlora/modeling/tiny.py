"""`tiny-random-mistral`: the embedded default model, built from a fixed seed, never downloaded.

A small Mistral-architecture model (GQA, RoPE, a sliding window shorter than the default rows so
every default run exercises it) with the real Mistral v1 tokenizer. It is built once into a
cache folder and then loaded like any local checkpoint (4-bit included).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from mistral_qlora.modeling.tokenizer import write_mistral_v1_tokenizer

TINY_VERSION = "v2"
TINY_SEED = 1234
TINY_CONFIG = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=32768,
    sliding_window=64,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.08,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)


def cache_root() -> Path:
    return Path(os.environ.get("MISTRAL_QLORA_CACHE", Path.home() / ".cache" / "mistral-qlora"))


def build_tiny_model(directory: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = MistralForCausalLM(MistralConfig(**TINY_CONFIG))
    model.save_pretrained(directory)
    write_mistral_v1_tokenizer(directory)


def build_once(final: Path, build) -> Path:
    """`final`, built by `build(folder)` on first use: into a temporary folder that is then renamed,
    so a reader never sees half a checkpoint and several ranks may race (the first rename wins)."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # lost the race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_tiny_model() -> Path:
    """The tiny checkpoint's folder, built on first use."""
    return build_once(cache_root() / f"tiny-random-mistral-{TINY_VERSION}", build_tiny_model)
