"""Synthetic data for the benchmark and the tests: lengths and records that look like
instruction data (short and uneven, a lognormal spread of lengths) without a dataset file.

- `lognormal_lengths`: sequence lengths around a median, clipped to [min_len, max_len];
- `token_examples`: tokenized examples of those lengths (random ids, the first third of each
  sequence a prompt with label -100), for timing steps without a tokenizer pass;
- `qa_records`: prompt/response text records, for runs through `train` (`bench --strategies`).
"""

from __future__ import annotations

import math
import random

from mistral_qlora.data.tokenize import IGNORE_INDEX

# The default length distribution: lognormal around a median of 256 tokens, at most 4096.
DEFAULT_MEDIAN = 256
DEFAULT_SIGMA = 1.0
DEFAULT_MAX_LEN = 4096
DEFAULT_MIN_LEN = 16

_WORDS = ("the river carries water from the hills to the sea and plants along its banks grow tall because "
          "farmers use it to water fields while children learn how rain clouds form when the sun warms lakes "
          "so that vapour rises cools and falls again as rain over the land").split()


def lognormal_lengths(
    n: int,
    median: int = DEFAULT_MEDIAN,
    sigma: float = DEFAULT_SIGMA,
    max_len: int = DEFAULT_MAX_LEN,
    min_len: int = DEFAULT_MIN_LEN,
    seed: int = 0,
) -> list[int]:
    """n sequence lengths, lognormal with the given median and sigma, clipped to [min_len, max_len]."""
    rng = random.Random(seed)
    mu = math.log(median)
    return [min(max_len, max(min_len, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def token_examples(lengths: list[int], vocab_size: int, seed: int) -> list[dict]:
    """One example per length: BOS then random ids; the first third is the prompt (label -100)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    examples = []
    for n in lengths:
        ids = [1] + torch.randint(3, vocab_size, (n - 1,), generator=gen).tolist()
        n_prompt = max(1, n // 3)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * n_prompt + ids[n_prompt:]})
    return examples


def qa_records(n: int = 3000, seed: int = 0) -> list[dict]:
    """prompt/response records of lognormal length: a median of about 256 tokens (about 1.3 tokens
    a word), at most about 4096."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = min(3000, max(16, int(math.exp(rng.gauss(math.log(190), 0.9)))))
        q = " ".join(rng.choice(_WORDS) for _ in range(max(4, words // 8)))
        a = " ".join(rng.choice(_WORDS) for _ in range(words - words // 8))
        out.append({"prompt": q.capitalize() + "?", "response": a.capitalize() + "."})
    return out
