"""Streaming: sources read as `datasets.IterableDataset`s, mixed, tokenized and packed on the fly.

A pass over the stream goes chunk by chunk. A chunk is `data.stream_buffer` records: for each one
the mix draws a source (mix.Chooser, the same draws a table mix makes), the source gives its next
record; the chunk is tokenized per source through token_cache.RecordTokenizer, packed best-fit
decreasing into rows of `data.tokens_per_row`, the rows shuffled (both seeded by seed, pass and
chunk) and yielded in that order. Memory is bounded by one chunk. The pass ends where the table
mix would (mix.py, `data.mix`): with `first_exhausted` at the first draw that finds its source
empty; with `all_exhausted` a source found empty starts again from its first record, and the pass
ends at the first draw that finds a source empty once all the others have been. The next
iteration starts the next pass.

The position before each chunk is kept: the pass, the chunk number, the chooser's state, each
source's `IterableDataset.state_dict()` and which sources have been found empty. `position_at(n)` is where row n (counted over
all passes) starts: a chunk's position and the rows of it already used. A checkpoint stores it;
`resume(position)` makes the next iteration restore the sources and the chooser, rebuild that
chunk and skip its used rows, so a resumed run sees exactly the rows an uninterrupted one would.
"""

from __future__ import annotations

import copy
import random
from array import array
from collections import deque

import torch

from mistral_qlora.config import DataSection
from mistral_qlora.data.mix import Chooser
from mistral_qlora.data.packing import pack_best_fit_decreasing
from mistral_qlora.data.sources import decode_errors, form_setting, needed_columns, open_stream, resolve, source_form
from mistral_qlora.data.tokenize import TokenCounts
from mistral_qlora.data.token_cache import RecordTokenizer
from mistral_qlora.errors import UserError

POSITION_FILE = "stream.json"  # the stream position, inside a checkpoint


class PackedStream(torch.utils.data.IterableDataset):
    """Packed rows (lists of {input_ids, labels}) from a weighted mix of streamed sources."""

    def __init__(self, sources: list, batchers: list[RecordTokenizer], columns: list[list[str]], weights: list[float],
                 seed: int, buffer: int, tokens_per_row: int, mix: str = "first_exhausted"):
        self.sources = sources
        self.batchers = batchers
        self.columns = columns
        self.weights = weights
        self.seed = seed
        self.buffer = buffer
        self.tokens_per_row = tokens_per_row
        self.mix = mix
        self.source_sizes: list[int | None] = [None] * len(sources)  # records, once the pass has found each empty
        self._start: dict | None = None  # where the next iteration starts
        self._marks: deque = deque(maxlen=4096)  # (rows before the chunk, the chunk's position)
        self.rows_seen = 0

    # -- positions -------------------------------------------------------------------------
    def resume(self, position: dict) -> None:
        self._start = copy.deepcopy(position)

    def position_at(self, rows: int) -> dict:
        """The position at which row `rows` (counted from the stream's start) begins."""
        for first, mark in reversed(self._marks):
            if first <= rows:
                return {**mark, "row": rows - first, "rows": rows}
        raise RuntimeError(f"stream row {rows} is older than the positions kept")

    # -- iteration -------------------------------------------------------------------------
    def __iter__(self):
        start = self._start or {"pass": 0, "chunk": 0, "chooser": None, "sources": None, "row": 0, "rows": 0}
        self._start = {"pass": start["pass"] + 1, "chunk": 0, "chooser": None, "sources": None, "row": 0,
                       "rows": None}  # the next iteration is the next pass
        self.rows_seen = start["rows"] - start["row"] if start["rows"] is not None else self.rows_seen
        for chunk_no, rows, examples, _ in self.chunks(start):
            skip = start["row"] if chunk_no == start["chunk"] else 0
            self.rows_seen += skip
            for row in rows[skip:]:
                self.rows_seen += 1
                yield [examples[i] for i in row]

    def chunks(self, start: dict):
        """(chunk number, rows, examples, per-source (records, kept, tokens, truncated)) of one pass;
        `self.source_sizes` holds each source's record count once a draw has found it empty."""
        pass_no = start["pass"]
        chooser = Chooser(self.weights, self.seed + pass_no, self.mix)
        if start["chooser"] is not None:
            chooser.restore(start["chooser"])
        # Fresh copies: a source restored from a state_dict would start there on every later pass.
        sources = [copy.deepcopy(src) for src in self.sources]
        for src, state in zip(sources, start["sources"] or [None] * len(sources)):
            if state is not None:
                src.load_state_dict(copy.deepcopy(state))
        iters = [iter(src) for src in sources]
        chunk_no = start["chunk"]
        read = [0] * len(self.sources)  # records read from each source since it (re)started (for error messages)
        states = start["sources"]  # before the first record is read, a source's state_dict is stale
        emptied = list(start.get("emptied") or [False] * len(sources))  # sources found empty in this pass
        self.source_sizes = [None] * len(sources)
        while True:
            mark = {"pass": pass_no, "chunk": chunk_no, "chooser": chooser.state(), "sources": copy.deepcopy(states),
                    "emptied": list(emptied)}
            self._marks.append((self.rows_seen, mark))
            picked: list[list[dict]] = [[] for _ in self.sources]
            numbers: list[list[int]] = [[] for _ in self.sources]  # each picked record's number in its source
            ended = False
            for s in chooser.draw(self.buffer):
                record = next(iters[s], None)
                if record is None:
                    if not emptied[s]:
                        self.source_sizes[s] = read[s]
                    emptied[s] = True
                    if self.mix == "first_exhausted" or all(emptied):
                        ended = True
                        break
                    sources[s] = copy.deepcopy(self.sources[s])  # from its first record, not a restored state
                    iters[s] = iter(sources[s])
                    read[s] = 0
                    record = next(iters[s])
                picked[s].append(record)
                numbers[s].append(read[s])
                read[s] += 1
            examples, counts = [], []
            for s, records in enumerate(picked):
                if not records:
                    counts.append((0, 0, 0, 0))
                    continue
                batch = {c: [r.get(c) for r in records] for c in self.columns[s]}
                out = self.batchers[s](batch, numbers[s])
                examples += [{"input_ids": i, "labels": lab} for i, lab in zip(out["input_ids"], out["labels"])]
                counts.append((len(records), len(out["length"]), sum(out["length"]), sum(out["truncated"])))
            tag = f"{self.seed}/{pass_no}/{chunk_no}"
            rows = pack_best_fit_decreasing([len(e["input_ids"]) for e in examples], self.tokens_per_row, tag)
            random.Random(tag).shuffle(rows)
            states = [src.state_dict() for src in sources]
            yield chunk_no, rows, examples, counts
            chunk_no += 1
            if ended:
                return

    def scan(self, max_chunks: int | None = None) -> tuple[TokenCounts, list[tuple], int]:
        """One pass from the start (or its first chunks), counted: (stats, per-source counts, rows).
        The stream's own position is left as it was."""
        saved_marks, saved_rows = self._marks, self.rows_seen
        self._marks = deque(maxlen=2)
        stats = TokenCounts()
        lengths = array("i")
        per_source = [[0, 0, 0, 0] for _ in self.sources]
        n_rows = 0
        try:
            start = {"pass": 0, "chunk": 0, "chooser": None, "sources": None, "row": 0, "rows": 0}
            for k, (_, rows, examples, counts) in enumerate(self.chunks(start)):
                lengths.extend(len(e["input_ids"]) for e in examples)
                n_rows += len(rows)
                for acc, c in zip(per_source, counts):
                    for j in range(4):
                        acc[j] += c[j]
                if max_chunks is not None and k + 1 >= max_chunks:
                    break
        finally:
            self._marks, self.rows_seen = saved_marks, saved_rows
        stats.records = sum(c[0] for c in per_source)
        stats.truncated = sum(c[3] for c in per_source)
        stats.dropped = sum(max(0, c[0] - c[1]) for c in per_source)  # a split document gives several records
        stats.lengths = lengths.tolist()
        return stats, [tuple(c) for c in per_source], n_rows


def open_streams(train_specs, cfg: DataSection, tokenizer, seed: int) -> tuple[PackedStream, list[dict]]:
    """The packed stream of the training sources, and what identifies each source."""
    streams, batchers, columns, identities = [], [], [], []
    for i, spec in enumerate(train_specs):
        res = resolve(spec)
        setting = form_setting(res, cfg.format)
        with decode_errors(res):
            ds = open_stream(res, setting)
            first = next(iter(ds), None)
        if first is None:
            raise UserError(f"{res.name}: the source is empty (no records)")
        form = source_form(list(first), setting, first, res.name)
        streams.append(ds)
        batchers.append(RecordTokenizer(tokenizer, form, res.name, cfg))
        columns.append(needed_columns(form, list(first)))
        identities.append({"index": i, "source": res.signature() if res.kind != "hub" else res.spec.path,
                           "columns": spec.columns, "split": spec.split, "subset": spec.subset,
                           "max_records": spec.max_records, "form": form})
    weights = [s.weight for s in train_specs]
    return PackedStream(streams, batchers, columns, weights, seed, cfg.stream_buffer, cfg.tokens_per_row,
                        cfg.mix), identities
