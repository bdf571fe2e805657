"""`mistral-qlora bench-data` (bench/data_step.py) on a tiny size, and the English-like records it
times the tokenizer on (bench/synthetic.py's `prose_records`)."""

from pathlib import Path

import pytest

from mistral_qlora.bench.synthetic import qa_records


@pytest.mark.slow  # every phase in a child process
def test_bench_data_on_a_tiny_size(tmp_path):
    from mistral_qlora.bench.data_step import bench_data, table

    results = bench_data(400, 100, tmp_path, max_seq_len=512, log=lambda m: None)
    by = {r["phase"]: r for r in results}
    assert list(by) == ["baseline", "first", "cached", "streaming"]
    assert by["first"]["tokens"] == by["cached"]["tokens"] == by["streaming"]["tokens"] > by["baseline"]["tokens"] > 0
    assert by["cached"]["from_cache"] and not by["first"]["from_cache"]
    assert all(r["peak_rss_gib"] > 0 and r["wall_s"] > 0 for r in results)
    assert all(0 < r["peak_pss_gib"] <= r["peak_rss_gib"] for r in results)  # shared pages counted once
    assert sum(1 for _ in open(tmp_path / "prose-400.jsonl")) == 400
    assert "| first | prose-400.jsonl |" in table(results)


def test_prose_records_read_like_a_language_not_a_word_list():
    """bench-data's records: deterministic for the seed, qa_records' word counts, and words that
    keep coming (tens of thousands of kinds, numbers among them), as natural text brings them."""
    import re

    from mistral_qlora.bench.synthetic import prose_records
    from mistral_qlora.model.base import resolve_model_path

    model_file = str(Path(resolve_model_path("tiny-random-mistral")) / "tokenizer.model")
    a = prose_records(1500, model_file, seed=7)
    assert a == prose_records(1500, model_file, seed=7) != prose_records(1500, model_file, seed=8)
    words = [w for r in a for w in (r["prompt"] + " " + r["response"]).split()]
    qa_words = [w for r in qa_records(1500, seed=7) for w in (r["prompt"] + " " + r["response"]).split()]
    assert abs(len(words) / len(qa_words) - 1) < 0.05
    kinds = {w.strip(",.?").lower() for w in words}
    assert len(kinds) > 20_000 and any(re.fullmatch(r"\d+", k) for k in kinds)
    assert all(r["prompt"].endswith("?") and r["response"].endswith(".") for r in a)


@pytest.mark.slow  # a child process per phase
def test_bench_data_on_raw_documents_splits_and_counts_every_token(tmp_path):
    """`bench-data --format raw`: documents of several records' prose, the phases through
    data.format=raw; the Arrow step and its list baseline keep the same tokens on the same file."""
    import json

    from mistral_qlora.bench.data_step import RAW_PARAGRAPHS, bench_data

    results = bench_data(60, 60, tmp_path, phases=("baseline", "first"), max_seq_len=512,
                         log=lambda m: None, form="raw")
    by = {r["phase"]: r for r in results}
    assert by["first"]["tokens"] == by["baseline"]["tokens"] > 0
    docs = [json.loads(line) for line in open(tmp_path / "prose-raw-60.jsonl")]
    assert len(docs) == 60 and all(d["text"].count("\n\n") == 2 * RAW_PARAGRAPHS - 1 for d in docs)
    assert by["first"]["rows"] > 0
