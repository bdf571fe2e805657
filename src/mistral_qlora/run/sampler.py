"""The training order, defined once for the whole run whatever the number of processes.

Each epoch is one seeded permutation of the training rows (packed rows, or records unpacked),
cut into global batches of `micro_batch_size x grad_accum x world_size` rows; the rows that do not
fill a last global batch are left out of that epoch (another permutation takes them next epoch).
The sampler yields the permutation's rows in order; the data loader cuts them into micro-batches
and accelerate hands micro-batch j to rank j mod world_size, so optimizer step s trains on rows
[s x B, (s + 1) x B) of its epoch's permutation, B the global batch. That set depends on the seed,
the epoch and B only: a run resumed on another number of processes with the same global batch
(run/elastic.py) trains the rows the uninterrupted run would have, step for step.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from mistral_qlora.errors import UserError


class GlobalOrderSampler(Sampler[int]):
    """Row indices of one epoch in the run's global order (see the module's docstring)."""

    def __init__(self, rows: int, global_batch: int, seed: int):
        if rows < global_batch:
            raise UserError(f"the training data has {rows} rows, fewer than one global batch of {global_batch} "
                            "(train.micro_batch_size x train.grad_accum x processes): lower one of them or add data")
        self.rows, self.global_batch, self.seed = rows, global_batch, seed
        self.epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.global_batch

    def __len__(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s rows, in the order the global batches take them."""
        gen = torch.Generator()
        gen.manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.rows, generator=gen)[: len(self)].tolist()

    def __iter__(self):
        return iter(self.order(self.epoch))
