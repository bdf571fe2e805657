"""The toy preference set dataset/story_pairs.jsonl, built from dataset/story.json, deterministically.

Each record's question (its first turn) with its own answer as `chosen` and another record's
answer as `rejected` (drawn by a seeded `random.Random`, never one equal to its own), so the
preference is learnable: the chosen answer is the one that belongs to the question.

`python -m mistral_qlora.tools.story_pairs [STORY_JSON] [OUT_FILE]` rewrites the file.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from mistral_qlora.files import atomic_write_text
from mistral_qlora.tools.story_tasks import story_pairs

SEED = 1234


def preference_pairs(pairs: list[tuple[str, str]], seed: int = SEED) -> list[dict]:
    """{prompt, chosen, rejected} per (question, answer): rejected is another record's answer."""
    rng = random.Random(seed)
    rows = []
    for i, (question, answer) in enumerate(pairs):
        others = [a for j, (_, a) in enumerate(pairs) if j != i and a != answer]
        rows.append({"prompt": question, "chosen": answer, "rejected": rng.choice(others)})
    return rows


def story_pairs_jsonl(story: Path, seed: int = SEED) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in preference_pairs(story_pairs(story), seed))


def write_story_pairs(story: Path, out: Path, seed: int = SEED) -> Path:
    atomic_write_text(out, story_pairs_jsonl(story, seed))
    return out


if __name__ == "__main__":
    story = Path(sys.argv[1] if len(sys.argv) > 1 else "dataset/story.json")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "dataset/story_pairs.jsonl")
    print(write_story_pairs(story, out))
