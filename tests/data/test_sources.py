"""Sources of every kind, mixed by weight, tokenized once into a cache that survives damage; bad
sources refused with one line; prepare's per-source report."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mistral_qlora.cli import main
from mistral_qlora.config import load_config
from mistral_qlora.data import build_data
from mistral_qlora.data.formats import records_to_conversations
from mistral_qlora.data.mix import mix_order
from mistral_qlora.bench.synthetic import qa_records
from mistral_qlora.data.tokenize import tokenize_conversations

from testkit import ROOT, write_jsonl

SEED = 7




def _cfg(tmp_path, *sets):
    return load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_len=256",
                              "data.tokens_per_row=256", *sets])


def _ids(table) -> list:
    return table["input_ids"][:] if len(table) else []


def cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_every_kind_of_source_gives_the_same_tokens(tmp_path, tok):
    import datasets
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    records = qa_records(60, seed=3)
    write_jsonl(tmp_path / "all.jsonl", records)
    (tmp_path / "all.json").write_text(json.dumps(records))
    table = pa.Table.from_pylist(records)
    pq.write_table(table, tmp_path / "all.parquet")
    pa.csv.write_csv(table, tmp_path / "all.csv")
    (tmp_path / "parts").mkdir()
    write_jsonl(tmp_path / "parts/a-0.jsonl", records[:25])
    write_jsonl(tmp_path / "parts/a-1.jsonl", records[25:])
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(tmp_path / "saved"))
    renamed = [{"question": r["prompt"], "answer": r["response"], "prompt": "an unrelated column"} for r in records]
    write_jsonl(tmp_path / "renamed.jsonl", renamed)

    convs = records_to_conversations(records, "auto", "x")
    expected, _ = tokenize_conversations(convs, tok, 256)
    paths = ["all.jsonl", "all.json", "all.parquet", "all.csv", "parts/a-*.jsonl", "saved"]
    for path in paths:
        data = build_data(_cfg(tmp_path, f"data.train={tmp_path / path}", "data.eval_fraction=0",
                                 "data.packing=false").data, tok, SEED)
        assert _ids(data.train) == [ex["input_ids"] for ex in expected], path
        assert data.train["labels"][:] == [ex["labels"] for ex in expected], path
    mapped = _cfg(tmp_path, f"data.train=[{{path: {tmp_path / 'renamed.jsonl'}, "
                            "columns: {prompt: question, response: answer}}]", "data.eval_fraction=0")
    assert _ids(build_data(mapped.data, tok, SEED).train) == [ex["input_ids"] for ex in expected]


@pytest.mark.parametrize("form", ["prompt_response", "instruction"])
def test_a_system_column_reaches_the_tokens(tmp_path, tok, form):
    """The `system` column of a file source is read, as the list reader reads it, not dropped."""
    records = [{"prompt": f"Question {i}?", "response": f"Answer {i}.", "system": "Be brief."} for i in range(4)]
    if form == "instruction":
        records = [{"instruction": r["prompt"], "output": r["response"], "system": r["system"]} for r in records]
    path = write_jsonl(tmp_path / "sys.jsonl", records)
    expected, _ = tokenize_conversations(records_to_conversations(records, "auto", "x"), tok, 256)
    data = build_data(_cfg(tmp_path, f"data.train={path}", "data.eval_fraction=0", "data.packing=false").data,
                      tok, SEED)
    assert _ids(data.train) == [ex["input_ids"] for ex in expected]
    assert records_to_conversations(records, "auto", "x")[0].system == "Be brief."


def test_held_out_split_is_the_list_split(tmp_path, tok):
    """One source: the same seeded split of record indices the list-based data step made."""
    import random

    records = qa_records(50, seed=4)
    data = build_data(_cfg(tmp_path, f"data.train={write_jsonl(tmp_path / 'a.jsonl', records)}",
                             "data.eval_fraction=0.2", "data.max_seq_len=4096", "data.tokens_per_row=4096").data,
                        tok, SEED, n_samples=3)
    order = list(range(50))
    random.Random(SEED).shuffle(order)
    eval_idx = sorted(order[:10])
    assert data.sample_prompts == [records[i]["prompt"] for i in eval_idx[:3]]
    assert (len(data.train), len(data.eval)) == (40, 10)


def test_mix_follows_the_weights_deterministically_and_never_repeats():
    source, local = mix_order([400, 1000], [3, 1], seed=1)
    pairs = set(zip(source.tolist(), local.tolist()))
    assert len(pairs) == len(source)  # no record twice
    assert (source == 0).sum() == 400  # the first source ran out first: the mix stops there
    assert abs((source == 0).mean() - 0.75) < 0.05
    for s, n in ((0, 400), (1, 1000)):
        assert (local[source == s] == np.arange((source == s).sum())).all() and (source == s).sum() <= n
    again, _ = mix_order([400, 1000], [3, 1], seed=1)
    other, _ = mix_order([400, 1000], [3, 1], seed=2)
    assert (again == source).all() and not (other[:len(source)] == source[:len(other)]).all()


def test_prepare_reports_each_source_and_its_share_of_the_mix(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", qa_records(300, seed=1))
    b = write_jsonl(tmp_path / "b.jsonl", [{"question": r["prompt"], "answer": r["response"]}
                                      for r in qa_records(300, seed=2)])
    sources = (f"data.train=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 3, "
               "columns: {prompt: question, response: answer}}]")
    args = ("prepare", str(ROOT / "configs/tiny.yaml"), "--set", sources, "--set", f"data.cache_dir={tmp_path / 'c'}",
            "--set", "data.max_seq_len=4096", "--set", "data.tokens_per_row=4096")
    code, out, err = cli(capsys, *args)
    assert code == 0, err
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  /")}
    la, lb = lines[str(a)], lines[str(b)]
    assert "270 records read, 270 kept" in la and "kept records drawn" in la
    assert "weight 25.0%" in la and "weight 75.0%" in lb
    share_b = float(lb.split("% of the mix")[0].split(", ")[-1])
    assert 65 < share_b < 85
    assert "[cached]" not in la
    code, out, _ = cli(capsys, *args)
    assert code == 0 and out.count("[cached]") == 2


def test_the_cache_is_read_the_second_time_and_rebuilt_when_damaged(tmp_path, tok, capsys):
    cfg = _cfg(tmp_path, f"data.train={write_jsonl(tmp_path / 'a.jsonl', qa_records(80, seed=5))}", "data.eval_fraction=0")
    first = build_data(cfg.data, tok, SEED)
    assert not first.sources[0].from_cache
    second = build_data(cfg.data, tok, SEED)
    assert second.sources[0].from_cache and _ids(second.train) == _ids(first.train)
    assert second.digest == first.digest
    expected = _ids(first.train)  # read now: the tables map the files damaged below

    (folder,) = [p for p in (tmp_path / "cache").glob("tokens-*") if p.is_dir()]
    (shard,) = folder.glob("*.arrow")
    for damage in ("truncate", "garble"):
        raw = shard.read_bytes()
        shard.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\0garbled" + raw[8:])
        capsys.readouterr()
        again = build_data(cfg.data, tok, SEED)
        err = capsys.readouterr().err
        assert f"warning: the data cache {folder} is damaged" in err and "building it again" in err, damage
        assert not again.sources[0].from_cache and _ids(again.train) == expected, damage
        (shard,) = folder.glob("*.arrow")

    # Another tokenizer setting is another cache entry, not a stale read
    other = build_data(_cfg(tmp_path, f"data.train={tmp_path / 'a.jsonl'}", "data.eval_fraction=0",
                              "data.train_on_prompt=true").data, tok, SEED)
    assert not other.sources[0].from_cache and other.digest != first.digest


@pytest.mark.parametrize("source", ["jsonl", "json-array"])
def test_a_build_in_tasks_on_worker_processes_equals_one_in_one_process(tmp_path, tok, monkeypatch, source):
    """Cut into tasks of a few batches (TASK_BYTES made small) on two worker processes, a file-backed
    (JSON Lines) and an in-memory (JSON array) table give the same tokens, in the same order, as one
    task in this process: the held-out split and the rest, one shard per task."""
    from mistral_qlora.data import token_cache

    records = qa_records(4500, seed=6)
    if source == "jsonl":
        path = write_jsonl(tmp_path / "a.jsonl", records)
    else:
        path = tmp_path / "a.json"
        path.write_text(json.dumps(records))
    sets = [f"data.train={path}", "data.eval_fraction=0.3"]
    one = build_data(_cfg(tmp_path, *sets, "data.num_proc=1", f"data.cache_dir={tmp_path / 'c1'}").data, tok, SEED)
    assert len(list((tmp_path / "c1").glob("tokens-*/*.arrow"))) == 2  # one shard each: eval and train
    monkeypatch.setattr(token_cache, "TASK_BYTES", 1)  # a task per batch of records at most
    two = build_data(_cfg(tmp_path, *sets, "data.num_proc=2", f"data.cache_dir={tmp_path / 'c2'}").data, tok, SEED)
    shards = sorted((tmp_path / "c2").glob("tokens-*/*.arrow"))
    assert len(shards) == 5 + 5  # each part's records spread over the table's 4500 rows: 5 spans of 1000
    assert _ids(one.train) == _ids(two.train) and _ids(one.eval) == _ids(two.eval)
    assert one.train["labels"][:] == two.train["labels"][:]
    assert one.train_stats.truncated == two.train_stats.truncated > 0
    assert one.train_stats.lengths == two.train_stats.lengths


def test_tasks_cut_by_the_bytes_of_the_table_they_span(monkeypatch):
    """A task's records lie within TASK_BYTES of the table: every record, or a sparse ascending
    selection (the held-out share), whose tasks are cut where the rows cross those bounds."""
    import datasets

    from mistral_qlora.data import token_cache

    table = datasets.Dataset.from_dict({"text": ["x" * 100] * 10_000})
    per_task = token_cache.BATCH * 2
    monkeypatch.setattr(token_cache, "TASK_BYTES", table.data.nbytes * per_task // len(table) + 1)
    assert token_cache.tasks(table, None, 10_000) == [(0, 2000), (2000, 4000), (4000, 6000), (6000, 8000),
                                                     (8000, 10_000)]
    rows = np.arange(0, 10_000, 7)  # every 7th record
    cut = token_cache.tasks(table, rows, len(rows))
    assert cut[0][0] == 0 and cut[-1][1] == len(rows) and all(a[1] == b[0] for a, b in zip(cut, cut[1:]))
    for start, stop in cut:
        assert rows[stop - 1] // per_task == rows[start] // per_task  # within one span of the table
    assert len(cut) == 5
    assert token_cache.tasks(table, rows[:3], 3) == [(0, 3)]


# -- bad sources: one line, exit 2, nothing written ---------------------------------------------

def _bad(capsys, tmp_path, *sets, command="train"):
    out_dir = tmp_path / "run"
    args = [command, str(ROOT / "configs/tiny.yaml"), "--set", f"data.cache_dir={tmp_path / 'c'}"]
    for s in sets:
        args += ["--set", s]
    if command == "train":
        args += ["--set", f"output_dir={out_dir}"]
    code, _, err = cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("mistral-qlora: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err  # progress bars may precede it
    assert not out_dir.exists()
    return lines[0]


def test_bad_sources_are_one_line_each(tmp_path, capsys):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q?", "answer": "a."}] * 4)
    err = _bad(capsys, tmp_path, f"data.train={qa}")
    assert f"{qa}: no columns of a known record form; its columns: question, answer" in err
    err = _bad(capsys, tmp_path, f"data.train=[{{path: {qa}, columns: {{prompt: q, response: answer}}}}]")
    assert f"{qa}: columns maps 'prompt' to 'q', which the source does not have; its columns: question, answer" in err
    err = _bad(capsys, tmp_path, f"data.train={qa}", "data.format=prompt_response")
    assert "needs the column(s) prompt, response; its columns: question, answer" in err
    err = _bad(capsys, tmp_path, f"data.train=[{{path: {qa}, weight: -1}}]")
    assert "data.train.0.weight: must be > 0 (got -1)" in err
    err = _bad(capsys, tmp_path, f"data.train=[{{path: {qa}, weight: lots}}]")
    assert "data.train.0.weight: Input should be a valid number" in err
    err = _bad(capsys, tmp_path, f"data.train={tmp_path}/nothing-*.jsonl")
    assert f"{tmp_path}/nothing-*.jsonl: the glob matches no file" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    err = _bad(capsys, tmp_path, f"data.train={empty}")
    assert f"{empty}:" in err and "empty" in err
    long = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "word " * 1000, "response": "ok"}] * 3)
    err = _bad(capsys, tmp_path, f"data.train={long}", "data.overlong=drop", "data.eval_fraction=0")
    assert f"{long}: every one of 3 training records is longer than data.max_seq_len=512" in err
    good = write_jsonl(tmp_path / "good.jsonl", qa_records(20))
    err = _bad(capsys, tmp_path, f"data.train={good}", "data.streaming=true", "data.eval_fraction=0")
    assert "data.streaming needs train.max_steps" in err
    err = _bad(capsys, tmp_path, f"data.train={good}", "data.streaming=true", "train.max_steps=5")
    assert "data.streaming cannot hold out data.eval_fraction" in err
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "a", "response": "b"}\n{"prompt": oops}\n')
    err = _bad(capsys, tmp_path, f"data.train={bad_json}")
    assert f"{bad_json}:2:" in err


def test_a_hub_id_goes_through_datasets_and_an_unreachable_hub_is_one_line(tmp_path, tok, monkeypatch, capsys):
    import datasets

    calls = []

    def fake_load(path, name=None, split=None, **kw):
        calls.append((path, name, split, kw.get("streaming", False)))
        return datasets.Dataset.from_list(qa_records(30, seed=8))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = _cfg(tmp_path, "data.train=[{path: someone/qa-set, subset: en, split: test}]", "data.eval_fraction=0")
    data = build_data(cfg.data, tok, SEED)
    assert calls == [("someone/qa-set", "en", "test", False)] and data.train_stats.records == 30
    monkeypatch.undo()

    # A real offline datasets: no network, no cache -> one line that says so
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "mistral_qlora", "prepare", str(ROOT / "configs/tiny.yaml"), "--set",
                           "data.train=nobody/no-such-dataset"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("mistral-qlora: error: nobody/no-such-dataset: not a local path, and the hub dataset "
                           "is not in the local cache while offline"), proc.stderr[-2000:]


@pytest.mark.slow
def test_processes_starting_together_tokenize_once(tmp_path):
    """Ranks (or runs) that prepare the same data at once: one builds the cache, the others read it."""
    data = write_jsonl(tmp_path / "a.jsonl", qa_records(1500, seed=9))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "mistral_qlora", "prepare", str(ROOT / "configs/tiny.yaml"), "--set",
           f"data.train={data}", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.eval_fraction=0"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert sum("[cached]" in out for out, _ in outs) == 2  # the two that waited read what the first built
    assert len([p for p in (tmp_path / "cache").glob("tokens-*") if p.is_dir()]) == 1
    assert len({out.replace("  [cached]", "") for out, _ in outs}) == 1  # and all saw the same data


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_that_is_not_utf8_is_one_line_naming_file_line_and_offset(tmp_path, capsys, suffix):
    """JSON Lines go through datasets/pyarrow, which load the bad byte into a string and fail when
    it is first read (a traceback before); a JSON array is decoded whole by load.py. Both: one line."""
    records = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(30)]
    text = "".join(json.dumps(r) + "\n" for r in records) if suffix == ".jsonl" else \
        "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n"
    raw = text.encode()
    at = raw.index(b"question 12?")
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(raw[:at] + b"\xe9" + raw[at + 1:])  # a latin-1 e-acute
    line = raw[:at].count(b"\n") + 1
    err = _bad(capsys, tmp_path, f"data.train={path}", command="prepare")
    assert f"{path}:{line}: not UTF-8 text: byte 0xe9 at byte offset {at} " in err, err


def test_a_jsonl_record_without_its_response_names_the_record_counted_from_0(tmp_path, capsys):
    """Through the table path (datasets' Arrow table, the token cache renumbering the batch's
    records): the record's index in the file, said to be 0-based, and the field said to be missing."""
    records = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(30)]
    del records[17]["response"]
    path = write_jsonl(tmp_path / "gap.jsonl", records)
    err = _bad(capsys, tmp_path, f"data.train={path}", "data.eval_fraction=0", command="prepare")
    assert err.endswith(f"{path} record 17 (0-based): the 'response' field is missing or null; "
                        "every record needs a non-empty 'response'"), err


def test_no_lock_file_outlives_a_cache_build_and_the_lock_still_excludes(tmp_path, tok):
    """The lock of a cache entry is removed with its release; a process that waited on the removed
    file locks the new one, so two holders never overlap (threads here: flock locks each open file)."""
    import threading
    import time

    from mistral_qlora.data.token_cache import entry_lock

    cfg = _cfg(tmp_path, f"data.train={write_jsonl(tmp_path / 'a.jsonl', qa_records(40, seed=5))}", "data.eval_fraction=0.2")
    build_data(cfg.data, tok, SEED)
    build_data(cfg.data, tok, SEED)  # read from the cache
    root = tmp_path / "cache"
    assert len([p for p in root.glob("tokens-*") if p.is_dir()]) == 2
    assert list(root.glob("*.lock")) == [] and list(root.glob(".*lock*")) == []

    path, inside, overlaps = tmp_path / "entry.lock", [], []

    def hold(n):
        with entry_lock(path):
            inside.append(n)
            overlaps.append(len(inside))
            time.sleep(0.05)
            inside.remove(n)

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == [1] * 6 and not path.exists()


def test_a_relative_data_path_is_read_from_the_current_directory_not_the_configs(tmp_path, tok, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "work").mkdir()
    write_jsonl(tmp_path / "conf/a.jsonl", qa_records(10, seed=1))  # beside the config: not this one
    write_jsonl(tmp_path / "work/a.jsonl", qa_records(30, seed=2))
    config = tmp_path / "conf/run.yaml"
    config.write_text(f"data:\n  train: a.jsonl\n  eval_fraction: 0\n  cache_dir: {tmp_path / 'cache'}\n")
    monkeypatch.chdir(tmp_path / "work")
    data = build_data(load_config(str(config), []).data, tok, SEED)
    assert data.train_stats.records == 30
