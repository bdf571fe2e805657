"""Batches for the Trainer: packed rows (the default) or padded batches (the baseline).

Packed: the sequences of the micro-batch's rows are concatenated into one (1, T) row with
`position_ids` restarting at 0 for each sequence and no `attention_mask`; transformers then builds
a block-diagonal (and windowed) mask for eager/SDPA/flex, and flash-style kernels take the
`cu_seq_lens_*`/`max_length_*` computed here on the CPU (no device sync inside the model).
The first token of every sequence gets label -100, so no sequence learns to predict the next.

Preference pairs (`PackedPairs`): a row holds whole pairs, each as two records, chosen then
rejected, so record 2k of a micro-batch is a chosen answer and record 2k+1 its rejected one. The
batch then also carries, per record in row order, `record_pair` (the pair's index in its table) and,
once the reference model's log-probs are known, `reference_logps` (each record's summed log-prob of
its answer under the reference). The loss pops both before the model's forward.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from mistral_qlora.data.tokenize import IGNORE_INDEX


class PackedRows(Dataset):
    """Item i is the list of examples packed into row i. `examples` is a list of dicts or a
    `datasets.Dataset` (memory-mapped Arrow), from which a row's examples are read in one take."""

    def __init__(self, examples, rows: list[list[int]]):
        self.examples = examples
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        if isinstance(self.examples, list):
            return [self.examples[j] for j in self.rows[i]]
        batch = self.examples[self.rows[i]]
        return [{"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"])]


class PackedPairs(Dataset):
    """Item i is row i's pairs as records: for each pair index j of `rows[i]`, its chosen record then
    its rejected one, each tagged with `pair` = j (and `reference`, its summed log-prob under the
    reference model, once `reference` is set). `pairs` is a `datasets.Dataset` with the columns
    chosen_ids, chosen_labels, rejected_ids, rejected_labels (data/preference.py), or a list of such
    dicts. `reference` is an array (len(pairs), 2): chosen's and rejected's summed log-probs."""

    def __init__(self, pairs, rows: list[list[int]], reference=None):
        self.pairs = pairs
        self.rows = rows
        self.reference = reference

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        row = self.rows[i]
        if isinstance(self.pairs, list):
            batch = {k: [self.pairs[j][k] for j in row] for k in ("chosen_ids", "chosen_labels", "rejected_ids",
                                                                 "rejected_labels")}
        else:
            batch = self.pairs[row]
        records = []
        for k, j in enumerate(row):
            for side, col in ((0, "chosen"), (1, "rejected")):
                rec = {"input_ids": batch[f"{col}_ids"][k], "labels": batch[f"{col}_labels"][k], "pair": j}
                if self.reference is not None:
                    rec["reference"] = float(self.reference[j, side])
                records.append(rec)
        return records


class PackedCollator:
    def __init__(self, with_cu_seqlens: bool = False):
        self.with_cu_seqlens = with_cu_seqlens

    def __call__(self, items: list[list[dict] | dict]) -> dict[str, torch.Tensor]:
        # Training items are packed rows (lists of examples); evaluation items are single examples.
        input_ids, labels, position_ids, seq_lens, pairs, reference = [], [], [], [], [], []
        for item in items:
            for ex in item if isinstance(item, list) else [item]:
                n = len(ex["input_ids"])
                input_ids += ex["input_ids"]
                labels += [IGNORE_INDEX] + ex["labels"][1:]
                position_ids += range(n)
                seq_lens.append(n)
                if "pair" in ex:
                    pairs.append(ex["pair"])
                if "reference" in ex:
                    reference.append(ex["reference"])
        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            # int32: positions and sequence boundaries are what the attention path takes as int32
            # (the flash-style kernels' cu_seqlens), and at long rows an int64 copy is twice the bytes
            "position_ids": torch.tensor([position_ids], dtype=torch.int32),
        }
        if pairs:
            batch["record_pair"] = torch.tensor(pairs, dtype=torch.long)
        if reference:
            batch["reference_logps"] = torch.tensor(reference, dtype=torch.float32)
        if self.with_cu_seqlens:
            cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
            cu[1:] = torch.cumsum(torch.tensor(seq_lens, dtype=torch.int32), 0)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu
            batch["max_length_q"] = batch["max_length_k"] = max(seq_lens)
        return batch


class PaddedCollator:
    """Right-padded batches with an attention mask: the tutorial's recipe."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(ex["input_ids"]) for ex in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, ex in enumerate(examples):
            n = len(ex["input_ids"])
            input_ids[i, :n] = torch.tensor(ex["input_ids"])
            labels[i, :n] = torch.tensor(ex["labels"])
            attention_mask[i, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
