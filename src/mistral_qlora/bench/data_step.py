"""`mistral-qlora bench-data`: how fast and how lean the data step is, phase by phase.

It writes a prompt/response JSON Lines file of `--records` records (synthetic.py's
lognormal lengths), or with `--format raw` a file of `--records` raw documents (`{"text"}`, each
RAW_PARAGRAPHS records' prose as paragraphs, so some are longer than max_seq_len and split), and a
file of its first `--baseline-records`, then runs each phase in a child
process of its own and reports tokens, wall time, tokens/s and the peak memory of the child and
its worker processes together, sampled with psutil: the sum of their resident sets (RSS, every
50 ms), and of their proportional sets (PSS, every second: each page shared by n processes counted
1/n in each, so the input table that every worker maps is counted once, not once per worker):
- `baseline`: the list-based data step the package had before the Arrow pipeline (read every record
  into a list, convert, tokenize all at once, hold out, pack), on the baseline file; for raw
  documents the same in lists (the fast tokenizer on every text at once, BOS and EOS added, split
  into chunks);
- `first`: `build_data` on the full file with an empty cache (tables, tokenizing map, packing);
- `cached`: the same again, reading the cache;
- `streaming`: one pass of the packed stream over the full file (`data.streaming`).
Nothing here is a test: the numbers go in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

PHASES = ("baseline", "first", "cached", "streaming")
FORMS = ("chat", "raw")  # what the generated file holds: prompt/response records or raw documents
RAW_PARAGRAPHS = 8  # records' prose per raw document
CHUNK = 10_000  # records generated at a time
# `bench-data`'s defaults (its flags read them): the generated file's records, the baseline's
# share of them (the list-based step holds everything in memory), the row budget.
RECORDS = 1_000_000
BASELINE_RECORDS = 200_000
MAX_SEQ_LEN = 4096
WORKDIR = "bench-data"


def write_records(path: Path, n: int, model_file: str, seed: int = 0, form: str = "chat") -> None:
    """n prompt/response records of English-like prose (synthetic.py's `prose_records`, words
    from `model_file`'s vocabulary) as JSON Lines, generated CHUNK at a time (bounded memory);
    with form `raw`, n documents `{"text"}` of RAW_PARAGRAPHS records' prompts and responses each,
    one paragraph a prompt or response."""
    from mistral_qlora.bench.synthetic import prose_records

    per = RAW_PARAGRAPHS if form == "raw" else 1
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for k, start in enumerate(range(0, n, CHUNK)):
            recs = prose_records(min(CHUNK, n - start) * per, model_file, seed=seed * 1_000_003 + k)
            if form == "raw":
                recs = [{"text": "\n\n".join(p for r in recs[i:i + per] for p in (r["prompt"], r["response"]))}
                        for i in range(0, len(recs), per)]
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def head_lines(src: Path, dst: Path, n: int) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    with open(src, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as out:
        for i, line in enumerate(f):
            if i >= n:
                break
            out.write(line)
    os.replace(tmp, dst)


def baseline_prepare(path: str, tokenizer, data_cfg, seed: int) -> int:
    """The list-based data step as it was before the Arrow pipeline; returns the tokens kept."""
    from mistral_qlora.data.formats import records_to_conversations
    from mistral_qlora.data.load import read_records
    from mistral_qlora.data.packing import pack_best_fit_decreasing

    if data_cfg.format == "raw":
        return baseline_raw(path, tokenizer, data_cfg, seed)
    convs = records_to_conversations(read_records(path), data_cfg.format, path)
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * data_cfg.eval_fraction))
    eval_convs = [convs[i] for i in sorted(order[:n_eval])]
    train_convs = [convs[i] for i in sorted(order[n_eval:])]
    args = (tokenizer, data_cfg.max_seq_len, data_cfg.overlong, data_cfg.train_on_prompt)
    train_lengths = baseline_tokenize(train_convs, *args)
    eval_lengths = baseline_tokenize(eval_convs, *args)
    pack_best_fit_decreasing(train_lengths, data_cfg.tokens_per_row, seed)
    return sum(train_lengths) + sum(eval_lengths)


def baseline_raw(path: str, tokenizer, data_cfg, seed: int) -> int:
    """Raw documents through the list-based step: every text read into a list, the fast tokenizer
    on all of them at once, BOS and EOS added and each document split into max_seq_len chunks in
    Python lists, held out and packed as `baseline_prepare` does; returns the tokens kept."""
    from mistral_qlora.data.load import read_records
    from mistral_qlora.data.packing import pack_best_fit_decreasing

    texts = [r["text"] for r in read_records(path)]
    bos, eos, size = tokenizer.bos_token_id, tokenizer.eos_token_id, data_cfg.max_seq_len
    docs = [[bos, *ids, eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(order) * data_cfg.eval_fraction))
    train = [docs[i] for i in sorted(order[n_eval:])]
    # what the step hands on: ids and labels of each chunk
    examples = [(c, [-100, *c[1:]]) for d in train for c in (d[k:k + size] for k in range(0, len(d), size))]
    lengths = [len(ids) for ids, _ in examples]
    pack_best_fit_decreasing(lengths, data_cfg.tokens_per_row, seed)
    return sum(lengths) + sum(len(docs[i]) for i in order[:n_eval])


def baseline_tokenize(conversations, tokenizer, max_seq_len: int, overlong: str, train_on_prompt: bool) -> list[int]:
    """The kept examples' lengths, tokenized as the data step did before the Arrow pipeline: the
    v1 template's prompts and answers each in one call of the fast tokenizer over all of them,
    ids and labels assembled per record in Python lists."""
    from mistral_qlora.data.templates import IGNORE_INDEX

    def encode(texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    conversations = [list(conv) for conv in conversations]
    prompt_ids = iter(encode([f"[INST] {p} [/INST]" for conv in conversations for p, _ in conv]))
    answer_ids = iter(encode([a for conv in conversations for _, a in conv]))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    lengths = []
    for conv in conversations:
        ids, labels = [bos], [IGNORE_INDEX]
        for _ in conv:
            p, a = next(prompt_ids), next(answer_ids) + [eos]
            ids += p + a
            labels += (p if train_on_prompt else [IGNORE_INDEX] * len(p)) + a
        if len(ids) > max_seq_len:
            if overlong == "drop":
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                continue
        lengths.append(len(ids))
    return lengths


def run_phase(phase: str, path: str, cache: str, max_seq_len: int, form: str = "chat") -> dict:
    """One phase, in this process (the child): {'tokens': ..., 'records': ...}."""
    from mistral_qlora.config import load_config
    from mistral_qlora.data import build_data
    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.tokenizer import load_tokenizer

    sets = [f"data.train={path}", f"data.max_seq_len={max_seq_len}", f"data.tokens_per_row={max_seq_len}",
            f"data.cache_dir={cache}"]
    if form == "raw":
        sets.append("data.format=raw")
    if phase == "streaming":
        sets += ["data.streaming=true", "data.eval_fraction=0", "train.max_steps=1"]  # a stream needs a step count
    cfg = load_config(None, sets)
    tokenizer = load_tokenizer(resolve_model_path(cfg.model.name_or_path), cfg.model.revision)
    if phase == "baseline":
        return {"tokens": baseline_prepare(path, tokenizer, cfg.data, cfg.train.seed)}
    data = build_data(cfg.data, tokenizer, cfg.train.seed)
    if phase == "streaming":
        tokens = rows = 0
        for row in data.stream:
            rows += 1
            tokens += sum(len(ex["input_ids"]) for ex in row)
        return {"tokens": tokens, "rows": rows}
    return {"tokens": data.train_stats.tokens + data.eval_stats.tokens, "rows": len(data.packed_rows),
            "from_cache": all(s.from_cache for s in data.sources)}


def measure(phase: str, path: Path, cache: Path, max_seq_len: int, form: str = "chat") -> dict:
    """Run a phase in a child process; its wall time and the peaks of its process tree's summed
    RSS and PSS (PSS where the platform reports it, Linux)."""
    import psutil

    cmd = [sys.executable, "-m", "mistral_qlora.bench.data_step", "--phase", phase, "--file", str(path),
           "--cache", str(cache), "--max-seq-len", str(max_seq_len), "--format", form]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0, 0]  # RSS, PSS

    def sample():
        # RSS every 50 ms; PSS (the kernel walks every mapping to compute it: milliseconds for a
        # process of gigabytes, taken from the 2 cores being measured) every 20th sample
        parent = psutil.Process(proc.pid)
        n = 0
        while proc.poll() is None:
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree))
                if n % 20 == 0:
                    peak[1] = max(peak[1], sum(getattr(p.memory_full_info(), "pss", 0) for p in tree))
            except psutil.Error:
                pass
            n += 1
            time.sleep(0.05)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"bench-data phase {phase} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    return {"phase": phase, "file": path.name, "wall_s": round(wall, 2), **result,
            "tokens_per_s": round(result["tokens"] / wall), "peak_rss_gib": round(peak[0] / 2**30, 3),
            "peak_pss_gib": round(peak[1] / 2**30, 3) if peak[1] else None}


def bench_data(records: int = RECORDS, baseline_records: int = BASELINE_RECORDS, workdir: Path = Path(WORKDIR),
               phases=PHASES, max_seq_len: int = MAX_SEQ_LEN, log=print, form: str = "chat") -> list[dict]:
    from mistral_qlora.config import load_config
    from mistral_qlora.model.base import resolve_model_path

    workdir.mkdir(parents=True, exist_ok=True)
    stem = "prose-raw" if form == "raw" else "prose"
    full = workdir / f"{stem}-{records}.jsonl"
    base = workdir / f"{stem}-{baseline_records}.jsonl"
    if not full.exists():
        log(f"writing {records:,} {'documents' if form == 'raw' else 'records'} to {full}")
        model = resolve_model_path(load_config(None, []).model.name_or_path)
        write_records(full, records, str(Path(model) / "tokenizer.model"), form=form)
    if "baseline" in phases and not base.exists():
        head_lines(full, base, baseline_records)
    cache = workdir / "cache"
    if "first" in phases and cache.exists():
        import shutil

        shutil.rmtree(cache)
    results = []
    for phase in phases:
        log(f"phase {phase} ...")
        r = measure(phase, base if phase == "baseline" else full, cache, max_seq_len, form)
        log(f"  {json.dumps(r)}")
        results.append(r)
    return results


def table(results: list[dict]) -> str:
    lines = ["| phase | file | tokens | wall (s) | tokens/s | peak RSS (GiB) | peak PSS (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        pss = f"{r['peak_pss_gib']:.2f}" if r.get("peak_pss_gib") is not None else "-"
        lines.append(f"| {r['phase']} | {r['file']} | {r['tokens']:,} | {r['wall_s']:.1f} | {r['tokens_per_s']:,} | "
                     f"{r['peak_rss_gib']:.2f} | {pss} |")
    return "\n".join(lines)


def _child_main(argv: list[str]) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--phase", required=True, choices=PHASES)
    p.add_argument("--file", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--max-seq-len", type=int, default=MAX_SEQ_LEN)
    p.add_argument("--format", default="chat", choices=FORMS)
    a = p.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    print(json.dumps(run_phase(a.phase, a.file, a.cache, a.max_seq_len, a.format)))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
