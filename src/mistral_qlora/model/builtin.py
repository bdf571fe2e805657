"""The built-in checkpoints, made from a fixed seed and never downloaded.

- `tiny-random-mistral`, the embedded default: a small Mistral-architecture model (GQA, RoPE, a
  64-token sliding window shorter than the default rows, so every default run exercises it).
- `tiny-random-tekken`: the same kind of model on Mistral-Nemo's Tekken vocabulary (`tekken.json`,
  131072 ids; the tokenizer transformers loads through mistral-common) with Nemo's shape in
  miniature: `head_dim` not hidden / heads. Small enough to train, merge and generate on a CPU, so
  Tekken data and tool calls can be tried end to end without a download.
- `random:mistral-7b`: Mistral-7B-Instruct-v0.2's architecture with random weights, for GPU
  machines without hub access: the same shapes, FLOPs and memory as the real checkpoint (bf16
  safetensors, about 14.5 GB, built on the GPU where there is one).
The others carry the real Mistral v1 tokenizer (model/tokenizer.py); all are built once into the cache
folder ($MISTRAL_QLORA_CACHE, else ~/.cache/mistral-qlora) and then load like any local
checkpoint, 4-bit included.
"""

from __future__ import annotations

import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from mistral_qlora.config import RANDOM_7B
from mistral_qlora.files import set_usual_modes
from mistral_qlora.model.tokenizer import write_mistral_tokenizer, write_mistral_v1_tokenizer

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

TINY_TEKKEN = "tiny-random-tekken"
TINY_TEKKEN_VERSION = "v1"
# Mistral-Nemo's shape in miniature: head_dim (32) is not hidden_size / heads (16), as Nemo's 128 is
# not 5120 / 32; the vocabulary is the Tekken file's n_words, its BOS/EOS/pad its control tokens.
TINY_TEKKEN_CONFIG = dict(
    vocab_size=131072,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=4096,
    sliding_window=None,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-5,
    initializer_range=0.08,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=11,
)

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


def cache_root() -> Path:
    return Path(os.environ.get("MISTRAL_QLORA_CACHE", Path.home() / ".cache" / "mistral-qlora"))


def build_once(final: Path, build) -> Path:
    """`final`, built by `build(folder)` on first use: into a temporary folder that is then renamed,
    so a reader never sees half a checkpoint and several ranks may race (the first rename wins)."""
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        build(tmp)
        set_usual_modes(tmp)  # mkdtemp's 0700 (and the library's temporary files' 0600) would survive the rename
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # lost the race to a complete copy: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_tiny_model(directory: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = MistralForCausalLM(MistralConfig(**TINY_CONFIG))
    model.save_pretrained(directory)
    write_mistral_v1_tokenizer(directory)


def ensure_tiny_model() -> Path:
    """The tiny checkpoint's folder, built on first use."""
    return build_once(cache_root() / f"tiny-random-mistral-{TINY_VERSION}", build_tiny_model)


def build_tiny_tekken_model(directory: Path) -> None:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    write_mistral_tokenizer(directory, "tekken")
    from mistral_qlora.data.tekken import TekkenEncoder

    config = dict(TINY_TEKKEN_CONFIG, vocab_size=TekkenEncoder(directory / "tekken.json").n_words)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = MistralForCausalLM(MistralConfig(**config))
    model.save_pretrained(directory)


def ensure_tiny_tekken_model() -> Path:
    """The tiny Tekken checkpoint's folder, built on first use."""
    return build_once(cache_root() / f"{TINY_TEKKEN}-{TINY_TEKKEN_VERSION}", build_tiny_tekken_model)


def build_random_7b(directory: Path, arch: dict = MISTRAL_7B_V02) -> None:
    """Random bf16 weights from a fixed seed, built directly on the GPU where there is one."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

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


def random_7b_dir(model_dir: str | Path | None = None) -> Path:
    return Path(model_dir) if model_dir else cache_root() / "random-mistral-7b-instruct-v0.2-arch"


def ensure_random_7b(model_dir: str | Path | None = None, arch: dict = MISTRAL_7B_V02) -> Path:
    """The random 7B checkpoint's folder (`model_dir`, else the cache folder), built on first use."""
    return build_once(random_7b_dir(model_dir), lambda folder: build_random_7b(folder, arch))
