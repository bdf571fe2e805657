"""The example lm-eval task data in dataset/tasks/, built from dataset/story.json, deterministically.

- `story_mc.jsonl`: each record's question with four answers, its own and three drawn from other
  records (a seeded `random.Random`, so the same file every time), the position of its own in
  `label`. Scored by log-likelihood (acc, acc_norm).
- `story_gen.jsonl`: each question with the first sentence of its answer as the target. Scored by
  lm-eval's exact_match on greedy text (case and punctuation ignored).

`python -m mistral_qlora.tools.story_tasks [STORY_JSON] [OUT_DIR]` rewrites both files; the task
YAMLs beside them are written by hand.
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

from mistral_qlora.data.formats import parse_text
from mistral_qlora.data.load import read_records
from mistral_qlora.files import atomic_write_text

SEED = 1234
CHOICES = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def story_pairs(story: Path) -> list[tuple[str, str]]:
    """(question, answer) of each record's first turn, in file order."""
    records = read_records(story)
    return [parse_text(r["text"], f"{story} record {i}")[0] for i, r in enumerate(records)]


def first_sentence(text: str) -> str:
    return _SENTENCE_END.split(text.strip(), maxsplit=1)[0]


def multiple_choice(pairs: list[tuple[str, str]], seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i, (question, answer) in enumerate(pairs):
        others = [a for j, (_, a) in enumerate(pairs) if j != i and a != answer]
        choices = rng.sample(others, CHOICES - 1) + [answer]
        rng.shuffle(choices)
        rows.append({"question": question, "choices": choices, "label": choices.index(answer)})
    return rows


def generation(pairs: list[tuple[str, str]]) -> list[dict]:
    return [{"question": q, "answer": first_sentence(a)} for q, a in pairs]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def write_story_tasks(story: Path, out: Path, seed: int = SEED) -> list[Path]:
    pairs = story_pairs(story)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, rows in (("story_mc.jsonl", multiple_choice(pairs, seed)), ("story_gen.jsonl", generation(pairs))):
        atomic_write_text(out / name, _jsonl(rows))
        written.append(out / name)
    return written


if __name__ == "__main__":
    story = Path(sys.argv[1] if len(sys.argv) > 1 else "dataset/story.json")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "dataset/tasks")
    for path in write_story_tasks(story, out):
        print(path)
