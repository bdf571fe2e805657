"""Worker for test_packing.py's multi-rank loss test (run under torch.distributed.run, or alone).

One SGD step (lr 1, no clipping) of the tiny model's LoRA weights on four packed rows of very
different token counts, with train.py's TrainingArguments; rank 0 saves the logged loss and the
updated weights. Under several ranks it also takes the control step: each rank normalising by its
own answer tokens (average_tokens_across_devices=False).
Usage: python dist_loss_worker.py OUT_FILE GRAD_ACCUM
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for testkit

from testkit.training import one_sgd_step, random_examples, tiny_lora_model  # noqa: E402

from mistral_qlora.data.collator import PackedCollator, PackedRows  # noqa: E402

ROWS = [[0], [1, 2], [3, 4, 5], [6]]
LENGTHS = [150, 40, 30, 20, 60, 33, 9]


class CountingCollator(PackedCollator):
    def __init__(self):
        super().__init__()
        self.answer_tokens = 0

    def __call__(self, items):
        batch = super().__call__(items)
        self.answer_tokens += int((batch["labels"][..., 1:] != -100).sum())
        return batch


def main(out: str, grad_accum: int) -> None:
    model = tiny_lora_model()
    start = copy.deepcopy(model.state_dict())
    dataset = PackedRows(random_examples(LENGTHS), ROWS)
    collator = CountingCollator()
    loss, weights = one_sgd_step(model, dataset, collator, 1, grad_accum, Path(out).parent / "trainer")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    result = {"loss": loss, "weights": weights, "start": {n: start[n] for n in weights}, "world_size": world}
    if world > 1:
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        torch.distributed.all_gather(counts, torch.tensor([collator.answer_tokens]))
        result["tokens_per_rank"] = [int(c) for c in counts]
        model.load_state_dict(start)
        _, result["per_rank_weights"] = one_sgd_step(model, dataset, PackedCollator(), 1, grad_accum,
                                                  Path(out).parent / "trainer-ctl",
                                                  average_tokens_across_devices=False)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
