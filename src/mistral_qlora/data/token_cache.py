"""Records -> tokenized rows, once: batched `datasets.map`s on a pool of worker processes, cached on disk.

`RecordTokenizer` is the one place records become conversations (formats.py) and conversations
become tokens (tokenize.py), or raw documents become tokens (raw.py); the map, the streaming
packer and the diagnostics all go through it. A raw document split into chunks gives several rows
(a batch's output may have more rows than its input).

The build (`_build`) cuts the records into tasks of at most TASK_BYTES of the input table
(`tasks`); each task is one `datasets.map` into an Arrow shard of its own. The tasks run on a pool
of data.num_proc processes that lives for the whole build, so a worker's tokenizer keeps the words
it has seen (spm.py) from task to task, while the part of the input file that a worker has mapped
into its memory is one task's, released when the task ends: the build's memory does not grow
with the dataset.

The cache: `<data.cache_dir>/tokens-<key>/` holds the shards (`part_*.arrow`, in record order)
and a `manifest.json` written last (rows, token count, shard sizes). The key is a hash of the
records' identity (file paths, sizes and modification times, or a hub dataset's cached files),
which of them are read (split, held-out selection, max_records, column mapping), the tokenizer
(its serialized vocabulary and chat template), every data setting that changes tokens, and the
code of this module and of the ones that make tokens. A folder is built under a temporary name
and renamed whole; several processes that start together take a file lock (`entry_lock`, whose
file is removed when it is let go), so one builds and the others read. A cache that does not match its manifest (missing or truncated shard, unreadable
Arrow, other row or token counts) is removed with a warning and built again.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mistral_qlora.data import formats, preference, ragged, raw, spm, tekken, templates, tokenize
from mistral_qlora.data.formats import record_label, records_to_conversations
from mistral_qlora.data.preference import PairEncoder, parse_pairs
from mistral_qlora.data.raw import RawEncoder, overlong_for, tokenize_raw
from mistral_qlora.data.templates import resolve_template
from mistral_qlora.data.tokenize import TokenBatch, tokenize_batch
from mistral_qlora.errors import UserError
from mistral_qlora.files import atomic_write_text
from mistral_qlora.logs import progress_bars
from mistral_qlora.runtime import log

BATCH = 1000  # records per tokenizer call: large enough for the fast tokenizer's batch path
TASK_BYTES = 64 << 20  # of the input table per task of the build (what a worker maps at a time)
PROGRESS_RECORDS = 50_000  # builds of at least this many records show a progress bar (on a terminal)
CACHE_VERSION = 1
# data settings that never change a record's tokens (everything else in DataSection does)
NOT_TOKEN_SETTINGS = {"train", "eval", "mix", "eval_fraction", "packing", "tokens_per_row", "streaming", "stream_buffer",
                      "num_proc", "cache_dir"}


@contextmanager
def datasets_quiet(progress: bool):
    """datasets' own logging off (its errors are reported as our one line), and its progress
    bars only where the work is long enough to watch, on a terminal (logs.progress_bars)."""
    import datasets

    bars = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = datasets.utils.logging.get_verbosity()
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    if not (progress and progress_bars()):
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


class RecordTokenizer:
    """A batch of records (columns) -> columns input_ids, labels, length, truncated.

    Records longer than data.max_seq_len are truncated or dropped by tokenize.py (raw documents:
    split, truncated or dropped by raw.py); the `truncated` column marks the truncated ones.
    data.overlong is resolved for the source's form (`raw.overlong_for`). Preference records
    (form `preference`) become pair rows instead (preference.py's columns: chosen_ids,
    chosen_labels, rejected_ids, rejected_labels, length of both, truncated and its counts).
    """

    def __init__(self, tokenizer, form: str, source: str, data_cfg, record_ids=None):
        self.tokenizer = tokenizer
        self.form = form
        self.source = source
        self.max_seq_len = data_cfg.max_seq_len
        self.overlong = overlong_for(form, data_cfg.overlong, source)
        self.train_on_prompt = data_cfg.train_on_prompt
        self.record_ids = record_ids  # the source's index of each row of a selected table (held-out split)
        self.template = resolve_template(data_cfg.template, tokenizer)  # data.template, as build_data resolves it
        self.raw = RawEncoder(tokenizer) if form == "raw" else None
        self.pairs = PairEncoder(self.template, self.max_seq_len, data_cfg.max_prompt_len, self.overlong,
                                 data_cfg.tokens_per_row) if form == preference.FORM else None

    def _record(self, row: int, indices: list[int]) -> int:
        """The source's index of the batch's row `row`."""
        row = indices[row]
        return self.record_ids[row] if self.record_ids is not None else row

    def conversations(self, batch: dict, indices: list[int]) -> list:
        """The batch's records as conversations (preference records: as preference.PreferencePair)."""
        keys = list(batch)
        records = [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]
        try:
            if self.pairs is not None:
                return parse_pairs(records, self.source)
            return records_to_conversations(records, self.form, self.source)
        except UserError as exc:  # name the record by its index in the source, not in the batch
            prefix = f"{self.source} record "
            text = str(exc)
            m = re.match(re.escape(prefix) + r"(\d+)", text)
            if m and int(m.group(1)) < len(indices):
                text = f"{prefix}{self._record(int(m.group(1)), indices)}" + text[m.end():]
            raise UserError(text) from None

    def pair_columns(self, batch: dict, indices: list[int]) -> dict:
        """A batch of preference records as the pair table's columns (lists)."""
        pairs = self.conversations(batch, indices)
        wheres = [f"{self.source} {record_label(self._record(k, indices))}" for k in range(len(pairs))]
        return self.pairs.encode(pairs, wheres)

    def tokenized(self, batch: dict, indices: list[int]) -> TokenBatch:
        convs = self.conversations(batch, indices)
        if self.raw is not None:  # documents (str), not conversations
            return tokenize_raw(convs, self.raw, self.max_seq_len, self.overlong)[0]
        out, _ = tokenize_batch(convs, self.tokenizer, self.max_seq_len, self.overlong, self.train_on_prompt,
                                self.template)
        return out

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        if self.pairs is not None:
            return self.pair_columns(batch, indices)
        out = self.tokenized(batch, indices)
        return {"input_ids": out.ids.lists(), "labels": out.labels.lists(),
                "length": out.ids.lengths.tolist(), "truncated": out.truncated.tolist()}

    def columns(self, batch: dict, indices: list[int]):
        """`__call__`'s columns as an Arrow table, what `datasets.map` writes to the cache, made
        from the ragged batch directly (no Python list per record)."""
        import pyarrow as pa

        if self.pairs is not None:
            return pa.Table.from_pydict(self.pair_columns(batch, indices), schema=self.features().arrow_schema)
        out = self.tokenized(batch, indices)
        return pa.table({"input_ids": out.ids.to_arrow(), "labels": out.labels.to_arrow(),
                         "length": pa.array(out.ids.lengths.astype(np.int32)),
                         "truncated": pa.array(out.truncated)})

    def features(self):
        """The columns this tokenizer writes (`datasets.Features`)."""
        return preference.features() if self.pairs is not None else features()


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
    for module in (formats, preference, ragged, raw, spm, tekken, templates, tokenize):
        h.update(Path(module.__file__).read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def cache_key(parts: dict, data_cfg, tokenizer_sig: str) -> str:
    settings = {k: v for k, v in data_cfg.model_dump().items() if k not in NOT_TOKEN_SETTINGS}
    blob = json.dumps({"v": CACHE_VERSION, "parts": parts, "settings": settings, "tokenizer": tokenizer_sig,
                       "code": code_signature()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


@dataclass
class TokenTable:
    dataset: object  # datasets.Dataset: input_ids, labels, length, truncated
    records: int  # records read (before drops)
    from_cache: bool

    @property
    def kept(self) -> int:
        return len(self.dataset)

    @property
    def dropped(self) -> int:
        # a raw document split into chunks gives more rows than records; none is dropped then
        return max(0, self.records - self.kept)


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


@contextmanager
def entry_lock(path: Path):
    """An exclusive lock on `path`, the file removed when the lock is let go.

    The holder unlinks the file while it still holds the lock; a process that was waiting on it
    then holds a lock on a file no longer at `path`, sees that (its descriptor's inode is not the
    one at `path`) and locks the file at `path` anew. So no lock file outlives its build, and two
    processes never both think they hold the lock. Without fcntl (Windows), filelock's lock, whose
    file stays."""
    try:
        import fcntl
    except ImportError:
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
        except BaseException:
            os.close(fd)
            raise
        if same:
            break
        os.close(fd)  # the holder before removed it: lock the one now at `path`
    try:
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)  # lets go of the lock


def tokenize_table(table, rows, fn: RecordTokenizer, key: str, root: Path, num_proc: int, what: str) -> TokenTable:
    """The records `rows` of `table` (all when None, else ascending row numbers) tokenized through
    `fn`, read from the cache under `key` or built into it."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"tokens-{key}"
    with entry_lock(root / f"tokens-{key}.lock"):
        if folder.is_dir():
            opened = _open_cached(folder)
            if opened is not None:
                ds, manifest = opened
                return TokenTable(ds, manifest["records"], True)
        ds, manifest = _build(table, rows, fn, folder, num_proc, what)
    return TokenTable(ds, manifest["records"], False)


def tasks(table, rows, n: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of the n selected records, each over at most TASK_BYTES of the table:
    a task's records lie within that many bytes of the table's rows, whether they are all of them
    or a sparse selection (a held-out share), so a worker maps at most that much of the table's
    file at a time."""
    per_task = max(BATCH, int(TASK_BYTES * len(table) / max(1, table.data.nbytes)))
    if rows is None:
        cuts = list(range(0, n, per_task))
    else:
        cuts = np.unique(np.searchsorted(np.asarray(rows), np.arange(0, len(table), per_task))).tolist()
        cuts = [c for c in cuts if c < n] or [0]
    return list(zip(cuts, cuts[1:] + [n]))


def _file_backed(table) -> bool:
    """Whether the table is Arrow files mapped from disk (pickled as their paths), not memory."""
    from datasets.table import ConcatenationTable, MemoryMappedTable

    data = table.data
    blocks = [b for row in data.blocks for b in row] if isinstance(data, ConcatenationTable) else [data]
    return all(isinstance(b, MemoryMappedTable) for b in blocks)


_INHERITED = None  # (table, fn) of the build, set before the pool's processes fork from this one


def _start_worker() -> None:
    import datasets

    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    datasets.utils.logging.disable_progress_bar()


def _run_task(table, rows, start: int, stop: int, out_file: str, fingerprint: str) -> tuple[int, int]:
    """Records [start, stop) of the selection mapped through the build's RecordTokenizer into
    `out_file`; the rows and tokens written. `table` is None in a worker when the table is in memory (the
    worker reads the copy it inherited); a file-backed table comes pickled, so the worker maps its
    files for this task alone and unmaps them when the task ends."""
    import pyarrow.compute as pc

    inherited, fn = _INHERITED
    table = inherited if table is None else table
    shard = table.select(range(start, stop) if rows is None else rows[start:stop])
    out = shard.map(lambda batch, idx: fn.columns(batch, [start + i for i in idx]), batched=True,
                    batch_size=BATCH, with_indices=True, remove_columns=shard.column_names, features=fn.features(),
                    cache_file_name=out_file, new_fingerprint=fingerprint)
    return len(out), pc.sum(out.data.column("length")).as_py() or 0


def _build(table, rows, fn: RecordTokenizer, folder: Path, num_proc: int, what: str):
    """The cache folder, built in tasks (`tasks`) of the table's records, each mapped by
    `datasets.map` into a shard of its own, on a pool of num_proc processes when there is more
    than one task. The pool's processes live for the whole build, so each keeps the words its
    tokenizer has seen (spm.py) from task to task."""
    global _INHERITED
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    rows = None if rows is None else np.asarray(rows, dtype=np.int64)
    n = len(table) if rows is None else len(rows)
    work = tasks(table, rows, n)
    names = [str(staging / f"part_{k:05d}.arrow") for k in range(len(work))]
    args = [(start, stop, name, f"{folder.name}-{k}") for k, ((start, stop), name) in enumerate(zip(work, names))]
    _INHERITED = (table, fn)
    try:
        with datasets_quiet(progress=False), tqdm(total=n, desc=f"tokenizing {what}", unit=" records",
                                                  disable=n < PROGRESS_RECORDS or not progress_bars()) as bar:
            if len(work) == 1:
                written = [_run_task(table, rows, *args[0])]
                bar.update(n)
            else:
                if num_proc > 1:
                    # Each worker process tokenizes its own tasks; the tokenizers' own threads
                    # would only compete with the other workers for the same cores.
                    os.environ["TOKENIZERS_PARALLELISM"] = "false"
                sent = table if _file_backed(table) else None
                with ProcessPoolExecutor(min(num_proc, len(work)), mp_context=multiprocessing.get_context("fork"),
                                         initializer=_start_worker) as pool:
                    futures = [pool.submit(_run_task, sent, rows, *a) for a in args]
                    records = {f: a[1] - a[0] for f, a in zip(futures, args)}
                    try:
                        for done in as_completed(futures):
                            done.result()
                            bar.update(records[done])
                    except BaseException:
                        pool.shutdown(cancel_futures=True)
                        raise
                    written = [f.result() for f in futures]
        manifest = {"records": n, "rows": sum(r for r, _ in written), "tokens": sum(t for _, t in written),
                    "shards": [{"file": Path(f).name, "bytes": Path(f).stat().st_size} for f in names]}
        for leftover in staging.iterdir():  # datasets' temporary files of the shards, if any
            if str(leftover) not in names:
                leftover.unlink()
        atomic_write_text(staging / "manifest.json", json.dumps(manifest, indent=1))
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        _INHERITED = None
    opened = _open_cached(folder)
    if opened is None:
        raise RuntimeError(f"{folder}: the data cache just written does not read back")
    return opened
