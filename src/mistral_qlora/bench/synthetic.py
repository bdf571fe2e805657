"""Synthetic data for the benchmark and the tests: lengths and records that look like
instruction data (short and uneven, a lognormal spread of lengths) without a dataset file.

- `lognormal_lengths`: sequence lengths around a median, clipped to [min_len, max_len];
- `token_examples`: tokenized examples of those lengths (random ids, the first third of each
  sequence a prompt with label -100), for timing steps without a tokenizer pass;
- `qa_records`: prompt/response text records, for runs through `train` (`bench --strategies`);
- `prose_records`: prompt/response records of the same lengths whose words follow a language's
  statistics, for timing tokenizers (`bench-data`): English words drawn by a Zipf-Mandelbrot law
  from a lexicon of several hundred thousand, with capitals, commas, full stops and numbers, so
  a tokenizer meets new words at about the rate natural text brings them instead of a few dozen
  words over and over.
"""

from __future__ import annotations

import math
import random
from functools import lru_cache

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


def _record_words(rng: random.Random) -> tuple[int, int]:
    """(prompt words, response words) of one record: lognormal around 190 words in all, 16 to
    3000, an eighth of them (at least 4) the prompt's."""
    words = min(3000, max(16, int(math.exp(rng.gauss(math.log(190), 0.9)))))
    return max(4, words // 8), words - words // 8


def qa_records(n: int = 3000, seed: int = 0) -> list[dict]:
    """prompt/response records of lognormal length: a median of about 256 tokens (about 1.3 tokens
    a word), at most about 4096."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        n_prompt, n_response = _record_words(rng)
        q = " ".join(rng.choice(_WORDS) for _ in range(n_prompt))
        a = " ".join(rng.choice(_WORDS) for _ in range(n_response))
        out.append({"prompt": q.capitalize() + "?", "response": a.capitalize() + "."})
    return out


# prose_records' lexicon: English words, the whole-word pieces of a SentencePiece vocabulary
# ranked by their score (BPE scores follow merge order, which follows frequency), then a tail of
# rarer words made of such a word and a word-internal piece; ranked by a Zipf-Mandelbrot law
# p(r) ~ 1 / (r + 2.7), the law word frequencies follow
TAIL_WORDS = 400_000  # made-up rare words: more word types than a million records use


@lru_cache(maxsize=2)
def _lexicon(model_file: str):
    """(words by rank, cumulative Zipf-Mandelbrot weights as a numpy array, their total)."""
    import re

    import numpy as np
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
    pieces = [(sp.get_score(i), sp.id_to_piece(i)) for i in range(sp.get_piece_size())]
    by_score = sorted(pieces, key=lambda scored: -scored[0])  # stable: equal scores keep id order
    heads = [p[1:] for _, p in by_score if re.fullmatch("\u2581([a-z]{2,12}|a|i)", p)]
    tails = [p for _, p in pieces if re.fullmatch("[a-z]{2,8}", p)]
    rng = random.Random(0)
    words = heads + [rng.choice(heads) + rng.choice(tails) for _ in range(TAIL_WORDS)]
    cum = np.cumsum(1.0 / (np.arange(len(words)) + 2.7))
    return words, cum, float(cum[-1])


def _sentences(rng: random.Random, draw, lexicon, n_words: int, end: str) -> str:
    words, cum, total = lexicon
    drawn = [words[i] for i in cum.searchsorted(draw.random(n_words) * total, side="right").tolist()]
    out, i = [], 0
    while i < n_words:
        k = min(n_words - i, max(3, round(rng.lognormvariate(math.log(14), 0.5))))
        sentence = drawn[i:i + k]
        if rng.random() < 0.3:  # a number in about a third of the sentences
            sentence[rng.randrange(k)] = str(rng.randrange(10 ** rng.randint(1, 5)))
        if k > 6 and rng.random() < 0.5:
            sentence[rng.randrange(2, k - 2)] += ","
        out.append(" ".join(sentence).capitalize() + ("." if i + k < n_words else end))
        i += k
    return " ".join(out)


def prose_records(n: int, model_file: str, seed: int = 0) -> list[dict]:
    """prompt/response records with `qa_records`' word counts, in prose whose words are drawn
    from the SentencePiece model's vocabulary (module docstring)."""
    import numpy as np

    lexicon = _lexicon(model_file)
    rng = random.Random(seed)
    draw = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        n_prompt, n_response = _record_words(rng)
        out.append({"prompt": _sentences(rng, draw, lexicon, n_prompt, "?"),
                    "response": _sentences(rng, draw, lexicon, n_response, ".")})
    return out
