"""Worker for test_eval.py's two-rank test (run under torch.distributed.run, or alone).

Evaluates the tiny model (float32, 16 bits) with RunTrainer on five packed rows of very different
token counts: with two ranks the rows split 3/2 and accelerate repeats one row on the second rank
to even out the last batch; the eval loss must not count it. Rank 0 saves the eval loss.
Usage: python dist_eval_worker.py OUT_FILE
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for testkit

from testkit import load_tiny_base  # noqa: E402
from testkit.training import random_examples  # noqa: E402

from mistral_qlora.data.collator import PackedCollator, PackedRows  # noqa: E402

ROWS = [[0], [1, 2], [3, 4, 5], [6], [7, 8]]
LENGTHS = [150, 40, 30, 20, 60, 33, 9, 120, 70]


def examples():
    return random_examples(LENGTHS)


def main(out: str) -> None:
    from transformers import TrainingArguments

    from mistral_qlora.run.trainer import RunTrainer

    model = load_tiny_base(attention="sdpa", dtype=torch.float32, bits=16).eval()
    args = TrainingArguments(output_dir=str(Path(out).parent / "trainer"), use_cpu=True,
                             per_device_eval_batch_size=1, report_to="none", remove_unused_columns=False)
    trainer = RunTrainer(model=model, args=args, eval_dataset=PackedRows(examples(), ROWS),
                         data_collator=PackedCollator())
    loss = trainer.evaluate()["eval_loss"]
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save({"loss": loss, "world_size": int(os.environ.get("WORLD_SIZE", "1"))}, out)


if __name__ == "__main__":
    main(sys.argv[1])
