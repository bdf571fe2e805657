"""Records -> tokenized rows, once: a batched `datasets.map` over worker processes, cached on disk.

`TokenizeBatch` is the one place records become conversations (formats.py) and conversations
become tokens (tokenize.py); the map, the streaming packer and the diagnostics all go through it.

The cache: `<data.cache_dir>/tokens-<key>/` holds the map's Arrow shards (`part_*.arrow`) and a
`manifest.json` written last (rows, token count, shard sizes). The key is a hash of the records'
identity (file paths, sizes and modification times, or a hub dataset's cached files), which of
them are read (split, held-out selection, max_records, column mapping), the tokenizer (its
serialized vocabulary and chat template), every data setting that changes tokens, and the code
of formats.py and tokenize.py. A folder is built under a temporary name and renamed whole; several
processes that start together take a file lock, so one builds and the others read. A cache that
does not match its manifest (missing or truncated shard, unreadable Arrow, other row or token
counts) is removed with a warning and built again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mistral_qlora.data import formats, spm, templates, tokenize
from mistral_qlora.data.formats import records_to_conversations
from mistral_qlora.data.templates import resolve_template
from mistral_qlora.data.tokenize import tokenize_conversations
from mistral_qlora.errors import UserError
from mistral_qlora.files import atomic_write_text
from mistral_qlora.runtime import log

BATCH = 1000  # records per tokenizer call: large enough for the fast tokenizer's batch path
PROGRESS_RECORDS = 50_000  # tables at least this large show datasets' progress bars
CACHE_VERSION = 1
# data settings that never change a record's tokens (everything else in DataSection does)
NOT_TOKEN_SETTINGS = {"train", "eval", "eval_fraction", "packing", "tokens_per_row", "streaming", "stream_buffer",
                      "num_proc", "cache_dir"}


@contextmanager
def datasets_quiet(progress: bool):
    """datasets' own logging off (its errors are reported as our one line), and its progress
    bars only where the work is long enough to watch."""
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    if not progress:
        datasets.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if bars:
            datasets.utils.logging.enable_progress_bar()


def cache_root(data_cfg) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    if os.environ.get("MISTRAL_QLORA_DATA_CACHE"):
        return Path(os.environ["MISTRAL_QLORA_DATA_CACHE"])
    return Path(os.environ.get("MISTRAL_QLORA_CACHE", Path.home() / ".cache" / "mistral-qlora")) / "data"


def worker_count(data_cfg, n_records: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = cores if data_cfg.num_proc == "auto" else data_cfg.num_proc
    return max(1, min(wanted, -(-n_records // BATCH)))  # no worker without a batch of its own


class TokenizeBatch:
    """A batch of records (columns) -> columns input_ids, labels, length, truncated.

    Records longer than data.max_seq_len are truncated or dropped by tokenize.py; the `truncated`
    column counts the truncated ones (its sum over a table is exact).
    """

    def __init__(self, tokenizer, form: str, source: str, data_cfg, record_ids=None):
        self.tokenizer = tokenizer
        self.form = form
        self.source = source
        self.max_seq_len = data_cfg.max_seq_len
        self.overlong = data_cfg.overlong
        self.train_on_prompt = data_cfg.train_on_prompt
        self.record_ids = record_ids  # the source's index of each row of a selected table (held-out split)
        self.template = resolve_template(data_cfg.template, tokenizer)  # data.template, as prepare_data resolves it

    def conversations(self, batch: dict, indices: list[int]) -> list:
        keys = list(batch)
        records = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        try:
            return records_to_conversations(records, self.form, self.source)
        except UserError as exc:  # name the record by its index in the source, not in the batch
            prefix = f"{self.source} record "
            text = str(exc)
            m = re.match(re.escape(prefix) + r"(\d+)", text)
            if m and int(m.group(1)) < len(indices):
                row = indices[int(m.group(1))]
                record = self.record_ids[row] if self.record_ids is not None else row
                text = f"{prefix}{record}" + text[m.end():]
            raise UserError(text) from None

    def _tokenize(self, convs):
        return tokenize_conversations(convs, self.tokenizer, self.max_seq_len, self.overlong, self.train_on_prompt,
                                      self.template)

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        convs = self.conversations(batch, indices)
        examples, stats = self._tokenize(convs)
        lengths = list(stats.lengths)
        # Truncated records are data.max_seq_len long; when a batch also holds records exactly
        # that long, only as many are marked as tokenize.py counted: the column's sum is exact.
        left = stats.truncated
        truncated = []
        for n in lengths:
            mark = left > 0 and n == self.max_seq_len
            left -= mark
            truncated.append(mark)
        return {"input_ids": [ex["input_ids"] for ex in examples], "labels": [ex["labels"] for ex in examples],
                "length": lengths, "truncated": truncated}

    def columns(self, batch: dict, indices: list[int]):
        """`__call__`'s columns as an Arrow table, what `datasets.map` writes to the cache: pyarrow
        converts the nested id lists in one call, several times faster than datasets' conversion
        of each record's list."""
        import pyarrow as pa

        out = self(batch, indices)
        ids = pa.list_(pa.int32())
        return pa.table({"input_ids": pa.array(out["input_ids"], ids), "labels": pa.array(out["labels"], ids),
                         "length": pa.array(out["length"], pa.int32()),
                         "truncated": pa.array(out["truncated"], pa.bool_())})


def features():
    from datasets import Features, Sequence, Value

    return Features({"input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                     "length": Value("int32"), "truncated": Value("bool")})


def tokenizer_signature(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id,
                   getattr(tokenizer, "chat_template", None))).encode())
    return h.hexdigest()


def code_signature() -> str:
    h = hashlib.sha256()
    for module in (formats, spm, templates, tokenize):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def cache_key(parts: dict, data_cfg, tokenizer_sig: str) -> str:
    settings = {k: v for k, v in data_cfg.model_dump().items() if k not in NOT_TOKEN_SETTINGS}
    blob = json.dumps({"v": CACHE_VERSION, "parts": parts, "settings": settings, "tokenizer": tokenizer_sig,
                       "code": code_signature()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class Tokenized:
    dataset: object  # datasets.Dataset: input_ids, labels, length, truncated
    records: int  # records read (before drops)
    from_cache: bool

    @property
    def kept(self) -> int:
        return len(self.dataset)

    @property
    def dropped(self) -> int:
        return self.records - self.kept


def _open_cached(folder: Path):
    """The cached table, or None (with a warning) when the folder does not match its manifest."""
    import datasets
    import pyarrow.compute as pc

    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        shards = []
        for shard in manifest["shards"]:
            path = folder / shard["file"]
            if path.stat().st_size != shard["bytes"]:
                raise ValueError(f"{shard['file']} has {path.stat().st_size} bytes, the manifest says {shard['bytes']}")
            shards.append(datasets.Dataset.from_file(str(path)))
        ds = shards[0] if len(shards) == 1 else datasets.concatenate_datasets(shards)
        if len(ds) != manifest["rows"]:
            raise ValueError(f"{len(ds)} rows, the manifest says {manifest['rows']}")
        tokens = pc.sum(ds.data.column("length")).as_py() or 0
        if tokens != manifest["tokens"]:
            raise ValueError(f"{tokens} tokens, the manifest says {manifest['tokens']}")
        return ds, manifest
    except Exception as exc:  # any damage: missing file, bad JSON, unreadable Arrow, other counts
        log(f"warning: the data cache {folder} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            "building it again")
        shutil.rmtree(folder, ignore_errors=True)
        return None


def tokenize_table(table, fn: TokenizeBatch, key: str, root: Path, num_proc: int, what: str) -> Tokenized:
    """`table` (raw records) tokenized through `fn`, read from the cache under `key` or built into it."""
    from filelock import FileLock

    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"tokens-{key}"
    with FileLock(str(root / f"tokens-{key}.lock")):
        if folder.is_dir():
            opened = _open_cached(folder)
            if opened is not None:
                ds, manifest = opened
                return Tokenized(ds, manifest["records"], True)
        ds, manifest = _build(table, fn, folder, num_proc, what)
    return Tokenized(ds, manifest["records"], False)


def _build(table, fn: TokenizeBatch, folder: Path, num_proc: int, what: str):
    import pyarrow.compute as pc

    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    if num_proc > 1:
        # Each worker process tokenizes its own batches; the fast tokenizer's own threads would
        # only compete with the other workers for the same cores.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with datasets_quiet(progress=len(table) >= PROGRESS_RECORDS):
            ds = table.map(fn.columns, batched=True, batch_size=BATCH, with_indices=True,
                           num_proc=num_proc if num_proc > 1 else None, remove_columns=table.column_names,
                           features=features(), cache_file_name=str(staging / "part.arrow"),
                           new_fingerprint=folder.name, desc=f"tokenizing {what}")
        files = [Path(c["filename"]) for c in ds.cache_files]
        manifest = {"records": len(table), "rows": len(ds),
                    "tokens": pc.sum(ds.data.column("length")).as_py() or 0,
                    "shards": [{"file": f.name, "bytes": f.stat().st_size} for f in files]}
        for leftover in staging.iterdir():  # datasets' temporary files of the shards, if any
            if leftover.name not in {f.name for f in files}:
                leftover.unlink()
        atomic_write_text(staging / "manifest.json", json.dumps(manifest, indent=1))
        del ds
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    opened = _open_cached(folder)
    if opened is None:
        raise RuntimeError(f"{folder}: the data cache just written does not read back")
    return opened
