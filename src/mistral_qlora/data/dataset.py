"""The data step of a run: sources -> validated, tokenized tables -> the train mix and the eval set.

Everything here runs before anything is written to output_dir (only the data cache is written),
so a bad record stops the run with nothing half-done. `build_data` is what `train` and
`prepare` both call.

Each source is opened as an Arrow table (sources.py), split into its train and held-out part when
`data.eval` is null (the same seeded shuffle of record indices as a list would get), tokenized
once into the cache (token_cache.py), and the train parts are mixed by weight as data.mix says (mix.py). The rows
packed for training are lists of indices into the mixed table; nothing holds the records or
tokens as Python lists, only the lengths. With `data.streaming` the train sources are streams
instead (stream.py) and only the eval set is a table.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field

import numpy as np

from mistral_qlora.config import DataSection, data_problems
from mistral_qlora.data.collator import PackedCollator, PackedPairs, PackedRows, PaddedCollator
from mistral_qlora.data.formats import Conversation
from mistral_qlora.data.mix import mix_tables
from mistral_qlora.data.packing import pack_best_fit_decreasing, packing_efficiency
from mistral_qlora.data.preference import COUNT_COLUMNS, FORM as PREFERENCE, PAIR_COLUMNS, drop_reason
from mistral_qlora.data.sources import (
    decode_errors,
    form_setting,
    needed_columns,
    open_table,
    resolve,
    source_form,
    source_list,
    table_signature,
)
from mistral_qlora.data.stream import open_streams
from mistral_qlora.data.templates import ChatTemplate, resolve_template
from mistral_qlora.data.tokenize import TokenCounts
from mistral_qlora.data.token_cache import (
    RecordTokenizer,
    cache_key,
    cache_root,
    tokenize_table,
    tokenizer_signature,
    worker_count,
)
from mistral_qlora.errors import UserError


@dataclass
class SourceStats:
    """One training source as `prepare` and the run's log report it: records read, kept after
    tokenizing, and what the mix used of them. `drawn` counts draws (a repeated record each time),
    `drawn_records` the distinct records drawn; `truncated` counts the truncated records among those.
    For a raw source (`form`), `records` counts documents and `kept` the records made of them
    (chunks, when data.overlong splits them)."""

    name: str
    weight: float
    records: int = 0
    kept: int = 0
    tokens: int = 0
    truncated: int = 0
    dropped: int = 0
    drawn: int = 0
    drawn_records: int = 0
    drawn_tokens: int = 0
    from_cache: bool = False
    counted: bool = True  # False for a stream before `prepare` has made its pass
    form: str = ""
    hub: bool = False  # a hub dataset id (the model card lists those under `datasets`)

    def describe(self, total_drawn: int, total_weight: float) -> str:
        """One line: what was read and kept, how much of it the mix uses, and its share."""
        head = f"  {self.name}: weight {self.weight / total_weight:.1%}"
        if not self.counted:
            return head + " (a stream: `prepare` makes a pass to count it)"
        kept = "chunks" if self.form == "raw" else "kept records"
        used = f"{self.drawn_records:,} of {self.kept:,} {kept} drawn ({self.drawn_records / max(1, self.kept):.0%})"
        repeats = self.drawn - self.drawn_records
        if repeats:
            used += f", {repeats:,} repeats ({self.drawn / max(1, self.drawn_records):.2f} draws a record)"
        read = (f"{self.records:,} documents read, {self.kept:,} chunks" if self.form == "raw"
                else f"{self.records:,} records read, {self.kept:,} kept")
        return (f"{head}; {read}, {self.tokens:,} tokens; {used}; "
                f"{self.drawn:,} draws, {self.drawn_tokens:,} tokens, {self.drawn / max(1, total_drawn):.1%} of the mix"
                + ("  [cached]" if self.from_cache else ""))


def source_lines(sources: list[SourceStats], mix: str) -> list[str]:
    """The training sources, one line each, under a line naming data.mix (what `prepare` prints and
    `train` logs)."""
    if not sources:
        return []
    total_drawn = sum(s.drawn for s in sources)
    total_weight = sum(s.weight for s in sources)
    ends = {"first_exhausted": "ends at the first source that runs out; no record repeated",
            "all_exhausted": "ends once every record of every source is drawn; smaller sources repeated"}[mix]
    return [f"sources (data.mix={mix}: {ends}):", *(s.describe(total_drawn, total_weight) for s in sources)]


@dataclass
class TrainingData:
    train: object  # datasets.Dataset (input_ids, labels, length) or None when streaming
    eval: object  # datasets.Dataset (input_ids, labels, length); empty list when there is none
    train_stats: TokenCounts
    eval_stats: TokenCounts
    sample_prompts: list[Conversation]  # held-out first turns (system + prompt), for samples.md
    packed_rows: list[list[int]] | None  # rows of train example indices, when packing
    tokens_per_row: int
    digest: str = ""  # what the tokens are: the cache keys and the mix (checkpoints compare it)
    sources: list[SourceStats] = field(default_factory=list)
    stream: object = None  # stream.PackedStream when data.streaming
    template: ChatTemplate | None = None  # what tokenized the data, and renders the prompts of samples
    # Preference data (data/preference.py): `train` and `eval` are pair tables (chosen_ids,
    # chosen_labels, rejected_ids, rejected_labels, length = both records' tokens), `packed_rows`
    # rows of pair indices, the stats count pairs; `sample_pairs` holds held-out (prompt, chosen
    # answer, rejected answer) for samples.md. Rows always hold whole pairs (packing: false = one
    # pair a row), so the items are PackedPairs and the collator the packed one.
    preference: bool = False
    sample_pairs: list = field(default_factory=list)
    # what `prepare` reports of preference data: for "train" (the pairs the mix draws) and "eval",
    # the counts of cut prompts and answers and the prompt / chosen / rejected lengths (`pair_counts`)
    pair_stats: dict = field(default_factory=dict)

    @property
    def packing_efficiency(self) -> float | None:
        if self.packed_rows is None:
            return None
        return packing_efficiency(self.train_stats.lengths, self.packed_rows, self.tokens_per_row)

    def answer_tokens(self) -> int:
        """Tokens of the training set that carry a label (the first of each record never does)."""
        if self.train is None:
            return 0
        import pyarrow.compute as pc

        total = 0
        columns = ["chosen_labels", "rejected_labels"] if self.preference else ["labels"]
        for batch in self.train.with_format("arrow", columns=columns).iter(batch_size=65536):
            for column in columns:
                flat = pc.list_flatten(pc.list_slice(batch[column], 1))
                total += len(flat) - int(pc.sum(pc.equal(flat, -100)).as_py() or 0)
        return total

    def train_dataset(self):
        if self.stream is not None:
            return self.stream
        if self.preference:
            return PackedPairs(self.train, self.packed_rows)
        return PackedRows(self.train, self.packed_rows) if self.packed_rows is not None else self.train

    def eval_dataset(self, micro_batch_size: int = 1, seed: int = 0):
        """The eval set as the Trainer iterates it, one item per forward: with packing, rows of
        micro_batch_size * tokens_per_row tokens (what one training micro-step holds); else records."""
        if not self.eval:
            return None
        if self.preference:
            return PackedPairs(self.eval, pack_best_fit_decreasing(self.eval_stats.lengths,
                                                                   self.tokens_per_row * micro_batch_size, seed))
        if self.packed_rows is None:
            return self.eval
        rows = pack_best_fit_decreasing(self.eval_stats.lengths, self.tokens_per_row * micro_batch_size, seed)
        return PackedRows(self.eval, rows)

    def collator(self, pad_token_id: int, with_cu_seqlens: bool = False):
        if self.packed_rows is not None or self.stream is not None or self.preference:
            return PackedCollator(with_cu_seqlens=with_cu_seqlens)
        return PaddedCollator(pad_token_id)


def held_out(n: int, fraction: float, seed) -> tuple[list[int], list[int]]:
    """(train indices, eval indices), both sorted: a seeded shuffle, the first share held out."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n * fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


@dataclass
class _Opened:
    """A source's table with its form and identity, before tokenizing."""

    table: object
    form: str
    name: str
    weight: float
    identity: dict
    resolved: object = None  # sources.Resolved: its files, searched for a byte that is not UTF-8


def open_source(spec, cfg: DataSection, index: int, role: str) -> _Opened:
    res = resolve(spec)
    setting = form_setting(res, cfg.format)
    table = open_table(res, setting, cache_root(cfg))
    with decode_errors(res):
        first = table[0]
    form = source_form(table.column_names, setting, first, res.name)
    table = table.select_columns(needed_columns(form, table.column_names))
    signature = res.signature() if res.kind != "hub" else table_signature(table)
    identity = {"role": role, "index": index, "source": signature, "hub": res.spec.path if res.kind == "hub" else None,
                "split": spec.split, "subset": spec.subset, "columns": spec.columns, "max_records": spec.max_records,
                "form": form, "records": len(table)}
    return _Opened(table, form, res.name, spec.weight, identity, res)


def _tokenize_part(opened: _Opened, rows, part: dict, cfg: DataSection, tokenizer, tok_sig: str, what: str):
    """The source's records `rows` (all when None) tokenized, and the cache key. A pair must fit a
    row whole (preference.py), so data.tokens_per_row is part of a preference table's key."""
    fn = RecordTokenizer(tokenizer, opened.form, opened.name, cfg, rows)
    if opened.form == PREFERENCE:
        part = {**part, "tokens_per_row": cfg.tokens_per_row}
    key = cache_key({**opened.identity, **part}, cfg, tok_sig)
    n = len(opened.table) if rows is None else len(rows)
    with decode_errors(opened.resolved):
        return tokenize_table(opened.table, rows, fn, key, cache_root(cfg), worker_count(cfg, n), what), key


def _lengths(table) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.asarray(table.with_format("numpy", columns=["length"])["length"][:], dtype=np.int64)


def _stats(records: int, truncated: int, lengths: np.ndarray) -> TokenCounts:
    return TokenCounts(records=records, truncated=truncated, dropped=max(0, records - len(lengths)),
                       lengths=lengths.tolist())


def _truncated(table) -> int:
    if len(table) == 0:
        return 0
    return int(np.count_nonzero(table.with_format("numpy", columns=["truncated"])["truncated"][:]))


def _first_prompts(parts: list[tuple[_Opened, object]], tokenizer, cfg: DataSection, n: int) -> list[Conversation]:
    prompts: list[Conversation] = []
    for opened, table in parts:
        if len(prompts) >= n:
            break
        if opened.form == "raw":  # documents have no prompt to answer
            continue
        take = table.select(range(min(n - len(prompts), len(table))))
        with decode_errors(opened.resolved):
            convs = RecordTokenizer(tokenizer, opened.form, opened.name, cfg).conversations(take[:],
                                                                                          list(range(len(take))))
        prompts += [Conversation(conv[:1], getattr(conv, "system", "")) for conv in convs]
    return prompts


def _first_pairs(parts: list[tuple[_Opened, object]], tokenizer, cfg: DataSection, n: int) -> list[tuple]:
    """Up to n held-out pairs as (prompt Conversation, chosen answer, rejected answer), for samples.md."""
    pairs: list[tuple] = []
    for opened, table in parts:
        if len(pairs) >= n:
            break
        take = table.select(range(min(n - len(pairs), len(table))))
        with decode_errors(opened.resolved):
            read = RecordTokenizer(tokenizer, opened.form, opened.name, cfg).conversations(take[:],
                                                                                         list(range(len(take))))
        pairs += [(p.prompt(), p.chosen.get("content", ""), p.rejected.get("content", "")) for p in read]
    return pairs


def pair_counts(table) -> dict:
    """A pair table's cuts and lengths, for `prepare`: pairs, prompts cut, answers cut, and the
    prompt / chosen / rejected token counts (numpy arrays)."""
    if not len(table):
        return {"pairs": 0}
    cols = table.with_format("numpy", columns=list(COUNT_COLUMNS))[:]
    return {"pairs": len(table), "prompt_truncated": int(np.count_nonzero(cols["prompt_truncated"])),
            "answer_truncated": int(np.count_nonzero(cols["answer_truncated"])),
            **{k: np.asarray(cols[k]) for k in ("prompt_len", "chosen_len", "rejected_len")}}


def _check_forms(opened: list[_Opened], preference: bool | None) -> bool:
    """Whether the sources are preference pairs; a run's sources are all pairs or none."""
    pairs = [o.name for o in opened if o.form == PREFERENCE]
    others = [o.name for o in opened if o.form != PREFERENCE]
    if pairs and (others or preference is False):
        other = others[0] if others else "data.train's sources"
        raise UserError(f"{pairs[0]}: preference pairs (chosen/rejected) and SFT records ({other}) in one run; a run "
                        "trains on one kind: give data.train and data.eval sources of one kind")
    if others and preference:
        raise UserError(f"{others[0]}: SFT records beside preference pairs (data.train); a run trains on one kind: "
                        "give data.eval preference pairs too")
    return bool(pairs)


def build_data(cfg: DataSection, tokenizer, seed: int, n_samples: int = 0) -> TrainingData:
    # load_config has refused these already; a section built without a RunConfig (the bench, the API)
    # is refused the same way, before any data is read.
    problems = data_problems(cfg)
    if problems:
        raise UserError("; ".join(problems))
    template = resolve_template(cfg.template, tokenizer)  # a template that cannot work is refused before any data is read
    train_specs, eval_specs = source_list(cfg.train), source_list(cfg.eval)
    if cfg.streaming:
        return build_stream(cfg, tokenizer, seed, n_samples, train_specs, eval_specs, template)
    tok_sig = tokenizer_signature(tokenizer)
    hold_out = not eval_specs and cfg.eval_fraction > 0

    train_parts, eval_raw, eval_parts, sources, keys = [], [], [], [], []
    opened_all = [open_source(spec, cfg, i, "train") for i, spec in enumerate(train_specs)]
    preference = _check_forms(opened_all, None)
    for i, (spec, opened) in enumerate(zip(train_specs, opened_all)):
        table = opened.table
        if hold_out:
            train_idx, eval_idx = held_out(len(table), cfg.eval_fraction, seed if i == 0 else f"{seed}/{i}")
            split = {"held_out": [cfg.eval_fraction, seed, i]}
            if eval_idx:
                eval_raw.append((opened, table.select(eval_idx)))
                tok, key = _tokenize_part(opened, eval_idx, {**split, "part": "eval"}, cfg, tokenizer, tok_sig,
                                          f"{opened.name} (held out)")
                eval_parts.append(tok)
        else:
            split, train_idx = {}, None
        tok, key = _tokenize_part(opened, train_idx, {**split, "part": "train"}, cfg, tokenizer, tok_sig, opened.name)
        keys.append(key)
        if tok.kept == 0 and preference:
            raise UserError(f"{opened.name}: every one of {tok.records} training pairs was dropped: "
                            f"{drop_reason(cfg.overlong if cfg.overlong != 'auto' else 'truncate')}")
        if tok.kept == 0:
            raise UserError(
                f"{opened.name}: every one of {tok.records} training records is longer than "
                f"data.max_seq_len={cfg.max_seq_len} tokens and was dropped; raise data.max_seq_len "
                "or set data.overlong=truncate"
            )
        train_parts.append(tok)
        sources.append(SourceStats(opened.name, spec.weight, tok.records, tok.kept, int(_lengths(tok.dataset).sum()),
                                   0, tok.dropped, from_cache=tok.from_cache, form=opened.form,
                                   hub=opened.resolved.kind == "hub"))
    weights = [s.weight for s in sources]
    train, source_of_row, _ = mix_tables([p.dataset for p in train_parts], weights, seed, cfg.mix)
    lengths = _lengths(train)
    drawn = np.bincount(source_of_row, minlength=len(sources))
    drawn_tokens = np.bincount(source_of_row, weights=lengths, minlength=len(sources))
    for k, (s, d, t) in enumerate(zip(sources, drawn, drawn_tokens)):
        # a source gives its records in order (again from the first when repeated), so the distinct
        # records drawn are its first ones
        s.drawn, s.drawn_records, s.drawn_tokens = int(d), min(int(d), s.kept), int(t)
        s.truncated = _truncated(train_parts[k].dataset.select(range(s.drawn_records)))
    train_stats = _stats(sum(p.records for p in train_parts), sum(s.truncated for s in sources), lengths)
    train_stats.dropped = sum(s.dropped for s in sources)

    eval_data, eval_stats, prompts, _ = eval_set(eval_specs, cfg, tokenizer, tok_sig, n_samples, eval_raw, eval_parts,
                                                 preference)

    rows = None
    if cfg.packing:
        rows = pack_best_fit_decreasing(train_stats.lengths, cfg.tokens_per_row, seed)
    elif preference:  # rows always hold whole pairs: one pair a row
        rows = [[i] for i in range(len(train_stats.lengths))]
    digest = hashlib.sha256(json.dumps({"tokens": keys, "weights": weights, "seed": seed, **_mix_part(cfg),
                                        **({"preference": True} if preference else {})})
                            .encode()).hexdigest()
    if not preference:
        return TrainingData(train.select_columns(["input_ids", "labels", "length"]), eval_data, train_stats,
                            eval_stats, prompts, rows, cfg.tokens_per_row, digest, sources, template=template)
    samples = prompts
    stats = {"train": pair_counts(train), "eval": pair_counts(eval_data) if eval_data else {"pairs": 0}}
    return TrainingData(train.select_columns([*PAIR_COLUMNS, "length"]),
                        eval_data.select_columns([*PAIR_COLUMNS, "length"]) if eval_data else eval_data,
                        train_stats, eval_stats, [p for p, _, _ in samples], rows, cfg.tokens_per_row, digest,
                        sources, template=template, preference=True, sample_pairs=samples, pair_stats=stats)


def _mix_part(cfg: DataSection) -> dict:
    """data.mix in the digest; the default left out, so the digests of runs before the key stay."""
    return {} if cfg.mix == "first_exhausted" else {"mix": cfg.mix}


def eval_set(eval_specs, cfg: DataSection, tokenizer, tok_sig: str, n_samples: int, raw=(), parts=(),
             preference: bool = False):
    """(eval table, its stats, the first n_samples prompts, cache keys): the held-out parts of the
    training sources (`raw`, `parts`) followed by every record of every data.eval source. For
    preference data the table keeps the pair columns and their counts, and the prompts are
    (prompt, chosen, rejected) of the first n_samples pairs."""
    raw, parts, keys = list(raw), list(parts), []
    for i, spec in enumerate(eval_specs):
        opened = open_source(spec, cfg, i, "eval")
        _check_forms([opened], preference)
        raw.append((opened, opened.table))
        tok, key = _tokenize_part(opened, None, {"part": "eval"}, cfg, tokenizer, tok_sig, f"{opened.name} (eval)")
        parts.append(tok)
        keys.append(key)
    first = _first_pairs if preference else _first_prompts
    prompts = first(raw, tokenizer, cfg, n_samples) if n_samples else []
    if not parts:
        return [], TokenCounts(), prompts, keys
    from datasets import concatenate_datasets

    table = concatenate_datasets([p.dataset for p in parts]) if len(parts) > 1 else parts[0].dataset
    stats = _stats(sum(p.records for p in parts), _truncated(table), _lengths(table))
    stats.dropped = sum(p.dropped for p in parts)
    if preference:  # the counts stay for `prepare`; build_data selects the pair columns
        return table, stats, prompts, keys
    return table.select_columns(["input_ids", "labels", "length"]), stats, prompts, keys


def build_stream(cfg: DataSection, tokenizer, seed: int, n_samples: int, train_specs, eval_specs,
                   template: ChatTemplate | None = None) -> TrainingData:
    """TrainingData whose training rows come from a stream.PackedStream; the eval set is a cached table."""
    stream, identities = open_streams(train_specs, cfg, tokenizer, seed)
    pairs = next((spec.path for spec, b in zip(train_specs, stream.batchers) if b.form == PREFERENCE), None)
    if pairs is not None:
        raise UserError(f"{pairs}: data.streaming does not read preference pairs (chosen/rejected); set "
                        "data.streaming=false")
    sample, _, _ = stream.scan(max_chunks=1)  # the first chunk: lengths for FLOPs and the summary
    if not sample.lengths:
        raise UserError(f"{train_specs[0].path}: no record of the stream's first {cfg.stream_buffer} fits "
                        f"data.max_seq_len={cfg.max_seq_len}; raise data.max_seq_len or set data.overlong=truncate")
    tok_sig = tokenizer_signature(tokenizer)
    evals, eval_stats, prompts, _ = eval_set(eval_specs, cfg, tokenizer, tok_sig, n_samples)
    key = cache_key({"stream": identities}, cfg, tok_sig)
    digest = hashlib.sha256(json.dumps({"stream": key, "weights": stream.weights, "seed": seed,
                                        "buffer": cfg.stream_buffer, "row": cfg.tokens_per_row, **_mix_part(cfg)})
                            .encode()).hexdigest()
    sources = [SourceStats(spec.path, spec.weight, counted=False, form=b.form,
                           hub=resolve(spec).kind == "hub")
               for spec, b in zip(train_specs, stream.batchers)]
    return TrainingData(None, evals, sample, eval_stats, prompts, None, cfg.tokens_per_row, digest, sources, stream,
                        template)
