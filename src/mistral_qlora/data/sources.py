"""Sources: where records come from, opened as `datasets` tables (Arrow, memory-mapped) or streams.

`data.train` / `data.eval` are a path or a list of `DataSource`s. A path is
- a local `.json`, `.jsonl`, `.parquet` or `.csv` file, or a glob of them (all of one type);
- a local `.txt` file or a glob of them: one raw document each (a record with a `text` column,
  read whole by `datasets`' text builder), of the `raw` form unless the source says otherwise;
- a folder written by `datasets` (`save_to_disk`), its `split` (default `train`);
- a hub dataset id, read by `datasets.load_dataset` with `subset` and `split` (the local hub cache
  is used as `datasets` does, so `HF_DATASETS_OFFLINE=1` works with a cached dataset).
`columns` renames the source's own columns to our field names, `max_records` keeps the first N.
Nothing is read into Python lists here except a JSON array file, which is parsed whole by
`load.read_records` (so its errors name line and column) and turned into an in-memory table.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mistral_qlora.config import DataSource
from mistral_qlora.data.formats import FORM_KEYS, OPTIONAL_KEYS, detect_format
from mistral_qlora.data.load import _looks_like_jsonl, read_records, utf8_problem
from mistral_qlora.data.token_cache import datasets_quiet
from mistral_qlora.errors import UserError

BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# options of a builder: a text file is one document, not one record per line
BUILDER_OPTIONS = {"text": {"sample_by": "document"}}
PROGRESS_BYTES = 64 * 2**20  # files at least this large show datasets' progress bar while converted
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def source_list(value) -> list[DataSource]:
    """data.train / data.eval as a list of sources (a plain path is one source of weight 1)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [DataSource(path=value)]
    return list(value)


@dataclass(frozen=True)
class Resolved:
    """Where a source's records are: local files of one type, a `datasets` folder, or a hub id."""

    spec: DataSource
    kind: str  # "files" | "folder" | "hub"
    files: tuple[str, ...] = ()
    builder: str | None = None

    @property
    def name(self) -> str:
        return self.spec.path

    def signature(self) -> list:
        """What identifies the records' content without reading them: every file's path, size and
        modification time (a hub id is identified by its cached files, see `table_signature`)."""
        paths = self.files
        if self.kind == "folder":
            paths = tuple(sorted(str(p) for p in Path(self.spec.path).rglob("*") if p.is_file()))
        sig = []
        for f in paths:
            st = os.stat(f)
            sig.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
        return sig


def resolve(spec: DataSource) -> Resolved:
    path = os.path.expanduser(spec.path)
    if any(ch in path for ch in "*?["):
        files = tuple(sorted(f for f in globlib.glob(path, recursive=True) if os.path.isfile(f)))
        if not files:
            raise UserError(f"{spec.path}: the glob matches no file")
    elif os.path.isdir(path):
        return Resolved(spec, "folder")
    elif os.path.isfile(path):
        files = (path,)
    elif _HUB_ID.fullmatch(spec.path) and Path(path).suffix not in BUILDERS:
        return Resolved(spec, "hub")
    else:
        raise UserError(f"{spec.path}: data file not found (set data.train / data.eval to an existing file, "
                        "a glob, a datasets folder or a hub dataset id)")
    suffixes = {Path(f).suffix for f in files}
    unknown = sorted(suffixes - set(BUILDERS))
    if unknown:
        raise UserError(f"{spec.path}: unsupported data file type '{unknown[0]}' (use .json, .jsonl, .parquet, "
                        ".csv, .txt, a datasets folder or a hub dataset id)")
    builders = {BUILDERS[s] for s in suffixes}
    if len(builders) > 1:
        raise UserError(f"{spec.path}: the glob mixes file types ({', '.join(sorted(suffixes))}); "
                        "give each type its own source")
    builder = builders.pop()
    if builder == "text":
        empty = next((f for f in files if os.path.getsize(f) == 0), None)
        if empty is not None:
            raise UserError(f"{empty}: the text file is empty; every raw document needs text (remove the file "
                            "or leave it out of the glob)")
    return Resolved(spec, "files", files, builder)


def table_signature(ds) -> list:
    """The Arrow files behind a table (a hub dataset's cache), by path, size and mtime."""
    return [[c["filename"], os.path.getsize(c["filename"]), os.stat(c["filename"]).st_mtime_ns]
            for c in ds.cache_files]


def _is_json_array(path: str) -> bool:
    if Path(path).suffix != ".json":
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(65536)
    return not _looks_like_jsonl(head)


def _hub_error(name: str, exc: Exception) -> UserError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
                  for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))
    if offline:
        return UserError(f"{name}: not a local path, and the hub dataset is not in the local cache while offline "
                         f"(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set): {first}")
    return UserError(f"{name}: not a local path, and the hub could not load it as a dataset id "
                     f"(unreachable hub or unknown dataset): {first}")


def _diagnose(res: Resolved, exc: Exception, form: str) -> UserError:
    """A table that `datasets` could not build: find the record at fault the way the list reader
    does (file:line:column for bad JSON, record index for a bad field), else quote the reader."""
    from mistral_qlora.data.formats import records_to_conversations
    from mistral_qlora.data.preference import parse_pairs

    if res.builder == "json":
        for f in res.files:
            records = read_records(f)  # raises on bad JSON, naming the line
            if form == "preference":
                parse_pairs(records, f)  # raises on a bad pair, naming the record
            else:
                records_to_conversations(records, form, f)  # raises on a bad field, naming the record
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserError(f"{res.name}: cannot read it as a table: {first}")


@contextmanager
def decode_errors(res: Resolved):
    """A string that is not UTF-8 in the source's files, as one line naming the file, line and byte
    offset. `datasets` reads JSON Lines and CSV into Arrow without checking the bytes of strings;
    the first read of such a string (a record's field) fails deep inside pyarrow, so the files are
    searched for the bad byte only then."""
    try:
        yield
    except UnicodeDecodeError as exc:
        for f in res.files:
            problem = utf8_problem(f)
            if problem:
                raise UserError(problem) from None
        raise UserError(f"{res.name}: not UTF-8 text ({exc.reason} at byte {exc.start} of a string); "
                        "save the data as UTF-8") from None


def open_table(res: Resolved, form: str, cache_dir: Path):
    """The source's records as a `datasets.Dataset`, columns renamed, first max_records kept."""
    import datasets

    spec = res.spec
    if res.kind == "files" and res.builder == "json" and all(_is_json_array(f) for f in res.files):
        records = [r for f in res.files for r in read_records(f)]
        if not records:
            raise UserError(f"{res.name}: the dataset is empty (no records)")
        try:
            ds = datasets.Dataset.from_list(records)
        except Exception as exc:  # pyarrow: a field with values of several types
            raise _diagnose(res, exc, form) from None
    elif res.kind == "files":
        big = sum(os.path.getsize(f) for f in res.files) >= PROGRESS_BYTES
        try:
            with datasets_quiet(progress=big):
                ds = datasets.load_dataset(res.builder, data_files=list(res.files), split="train",
                                           cache_dir=str(cache_dir / "tables"), **BUILDER_OPTIONS.get(res.builder, {}))
        except Exception as exc:
            raise _diagnose(res, exc, form) from None
    elif res.kind == "folder":
        ds = _load_folder(res)
    else:
        try:
            with datasets_quiet(progress=True):
                ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split or "train")
        except Exception as exc:
            raise _hub_error(res.name, exc) from None
    ds = _rename(ds, res)
    if spec.max_records is not None and spec.max_records < len(ds):
        ds = ds.select(range(spec.max_records))
    if len(ds) == 0:
        raise UserError(f"{res.name}: the source is empty (no records)")
    return ds


def open_stream(res: Resolved, form: str):
    """The source as a `datasets.IterableDataset` (nothing read until iterated)."""
    import datasets

    spec = res.spec
    if res.kind == "files":
        with datasets_quiet(progress=False):
            ds = datasets.load_dataset(res.builder, data_files=list(res.files), split="train", streaming=True,
                                       **BUILDER_OPTIONS.get(res.builder, {}))
    elif res.kind == "folder":
        ds = _load_folder(res).to_iterable_dataset()
    else:
        try:
            with datasets_quiet(progress=False):
                ds = datasets.load_dataset(spec.path, spec.subset, split=spec.split or "train", streaming=True)
        except Exception as exc:
            raise _hub_error(res.name, exc) from None
    names = ds.column_names
    if names is None:  # a JSON stream's columns are known once a record is read
        first = next(iter(ds), None)
        if first is None:
            raise UserError(f"{res.name}: the source is empty (no records)")
        names = list(first)
    ds = _rename(ds, res, names)
    if spec.max_records is not None:
        ds = ds.take(spec.max_records)
    return ds


def _load_folder(res: Resolved):
    import datasets

    try:
        ds = datasets.load_from_disk(res.spec.path)
    except FileNotFoundError:
        raise UserError(f"{res.name}: folder is not a saved datasets.Dataset (no dataset_info.json / state.json)") \
            from None
    if isinstance(ds, datasets.DatasetDict):
        split = res.spec.split or "train"
        if split not in ds:
            raise UserError(f"{res.name}: DatasetDict without a '{split}' split (has: {', '.join(ds)})")
        ds = ds[split]
    elif res.spec.split:
        raise UserError(f"{res.name}: split '{res.spec.split}' asked for, but the folder holds one Dataset")
    return ds


def _rename(ds, res: Resolved, names: list[str] | None = None):
    names = list(names if names is not None else ds.column_names)
    mapping = res.spec.columns
    for ours, theirs in mapping.items():
        if theirs not in names:
            raise UserError(f"{res.name}: columns maps '{ours}' to '{theirs}', which the source does not have; "
                            f"its columns: {', '.join(names)}")
    drop = [ours for ours, theirs in mapping.items() if ours in names and ours != theirs
            and ours not in mapping.values()]
    if drop:
        ds = ds.remove_columns(drop)
    renames = {theirs: ours for ours, theirs in mapping.items() if ours != theirs}
    return ds.rename_columns(renames) if renames else ds


def form_setting(res: Resolved, data_format: str) -> str:
    """The form a source asks for: its own `format`, else data.format; under `auto` a source of
    `.txt` files is raw (a text file has no other form), while records are detected
    (`source_form`), never as raw."""
    form = res.spec.format or data_format
    if form == "auto" and res.builder == "text":
        return "raw"
    return form


def source_form(columns: list[str], form: str, first_record: dict | None, name: str) -> str:
    """The record form of a source (data.format, or detected), checked against its columns."""
    if form == "auto":
        present = {k: v for k, v in (first_record or {c: "" for c in columns}).items() if v is not None}
        if any(k in present for k in FORM_KEYS["preference"]):
            return detect_format(present, name)  # a pair, or one half of it named as missing
        try:
            return detect_format(present, name)
        except UserError:
            raise UserError(f"{name}: no columns of a known record form; its columns: {', '.join(columns)}; "
                            "expected 'text', 'messages', 'prompt'+'response', 'instruction'+'output' or "
                            "'chosen'+'rejected' (map other names with the source's columns: {prompt: ..., response: ...})") from None
    missing = [k for k in FORM_KEYS[form] if k not in columns]
    if missing:
        raise UserError(f"{name}: format {form} needs the column(s) {', '.join(missing)}; its columns: "
                        f"{', '.join(columns)} (map them with the source's columns: {{ours: theirs}})")
    return form


def needed_columns(form: str, columns: list[str]) -> list[str]:
    return [c for c in (*FORM_KEYS[form], *OPTIONAL_KEYS.get(form, ())) if c in columns]
