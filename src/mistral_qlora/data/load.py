"""Read a dataset file or folder into a list of plain dict records.

JSON arrays and JSON Lines are parsed here (so a syntax error names the file, line and column);
Parquet files and folders written by `datasets.Dataset.save_to_disk` go through `datasets`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mistral_qlora.errors import UserError


def read_records(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{path}: data file not found (set data.train / data.eval to an existing file)")
    if p.is_dir():
        records = _read_hf_folder(p)
    elif p.suffix == ".parquet":
        records = _read_parquet(p)
    elif p.suffix in (".json", ".jsonl"):
        text = _read_text(p)
        if p.suffix == ".jsonl" or _looks_like_jsonl(text):
            records = _parse_jsonl(p, text)
        else:
            records = _parse_json_array(p, text)
    else:
        raise UserError(f"{path}: unsupported data file type '{p.suffix}' (use .json, .jsonl, .parquet or a datasets folder)")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UserError(f"{path}: record {i} (0-based) is a {type(rec).__name__}, expected an object like {{\"text\": ...}}")
    return records


def _read_text(p: Path) -> str:
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(utf8_problem(p) or f"{p}: not UTF-8 text; save the file as UTF-8") from None


def utf8_problem(path: str | Path, block: int = 16 << 20) -> str | None:
    """Where a file stops being UTF-8, as one line naming the file, the line (1-based) and the byte
    offset (0-based) of the first bad byte; None when it all decodes. Read in blocks, a character
    cut by a block's end carried into the next."""
    offset, lines, carry = 0, 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            chunk, last = carry + data, not data
            try:
                chunk.decode("utf-8")
                carry = b""
            except UnicodeDecodeError as exc:
                if exc.reason == "unexpected end of data" and not last:
                    carry = chunk[exc.start:]  # a character the next block completes
                    chunk = chunk[:exc.start]
                else:
                    at = offset + exc.start
                    line = lines + chunk.count(b"\n", 0, exc.start) + 1
                    return (f"{path}:{line}: not UTF-8 text: byte 0x{chunk[exc.start]:02x} at byte offset {at} "
                            "(line 1-based, offset 0-based); save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
            lines += chunk.count(b"\n")
            offset += len(chunk)
            if last:
                return None


def _looks_like_jsonl(text: str) -> bool:
    """A .json file whose content is one object per line (as many exporters write it)."""
    stripped = text.lstrip()
    if not stripped.startswith("{"):
        return False
    first_line = stripped.split("\n", 1)[0]
    try:
        json.loads(first_line)
    except json.JSONDecodeError:
        return False
    return True


def _parse_json_array(p: Path, text: str) -> list:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{p}:{exc.lineno}:{exc.colno}: malformed JSON: {exc.msg}") from None
    if isinstance(data, dict):
        # {"data": [...]} / {"train": [...]}: accept one list-valued key, as common exports do.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
    if not isinstance(data, list):
        raise UserError(f"{p}: expected a JSON array of records, got a {type(data).__name__}")
    return data


def _parse_jsonl(p: Path, text: str) -> list:
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UserError(f"{p}:{lineno}:{exc.colno}: bad JSON line: {exc.msg}") from None
    return records


def _read_parquet(p: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(p).to_pylist()
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise UserError(f"{p}: cannot read Parquet file: {str(exc).splitlines()[0]}") from None


def _read_hf_folder(p: Path) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except FileNotFoundError:
        raise UserError(f"{p}: folder is not a saved datasets.Dataset (no dataset_info.json / state.json)") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{p}: DatasetDict without a 'train' split (has: {', '.join(ds)})")
        ds = ds["train"]
    return ds.to_list()
