"""data.mix: first_exhausted (no record repeated) or all_exhausted (every record of every source
drawn, the smaller sources repeated to keep their weight's share); the same draws for tables and
streams; what prepare and the run's log say of each source."""

import json

import numpy as np
import pytest

from mistral_qlora.config import load_config
from mistral_qlora.data import build_data
from mistral_qlora.data.mix import mix_order

from testkit import ROOT, write_jsonl

SEED = 7




def _short(n: int, tag: str) -> list[dict]:
    return [{"prompt": f"{tag} question {i}?", "response": f"answer {i}."} for i in range(n)]


@pytest.mark.parametrize("seed", range(5))
def test_all_exhausted_draws_every_record_and_keeps_the_weights(seed):
    """1,116 and 71 records at 0.7/0.3: every record of both drawn at least once, the small source
    repeated about 6.7 times, and each source's share of the mix within 2% of its weight's."""
    sizes, weights = [1116, 71], [0.7, 0.3]
    source, local = mix_order(sizes, weights, seed, "all_exhausted")
    for s, n in enumerate(sizes):
        assert set(local[source == s].tolist()) == set(range(n))  # every record, nothing beyond
        assert abs((source == s).mean() - weights[s]) < 0.02
        assert (local[source == s] == np.arange((source == s).sum()) % n).all()  # in order, again from the first
    assert (source == 1).sum() > 6 * 71
    again, again_local = mix_order(sizes, weights, seed, "all_exhausted")
    assert (again == source).all() and (again_local == local).all()  # deterministic for the seed

    # three sources of very different sizes and weights
    sizes, weights = [5000, 300, 12], [1, 2, 1]
    source, local = mix_order(sizes, weights, seed, "all_exhausted")
    for s, n in enumerate(sizes):
        assert set(local[source == s].tolist()) == set(range(n))
        assert abs((source == s).mean() - weights[s] / sum(weights)) < 0.02


def test_first_exhausted_is_the_default_and_leaves_most_of_a_large_source(tmp_path, tok):
    """The issue's case: 0.7/0.3 over 1,116 and 71 records draws only part of the 1,116 (the mix
    ends when the 71 run out); all_exhausted draws them all."""
    big, small = write_jsonl(tmp_path / "big.jsonl", _short(1116, "big")), write_jsonl(tmp_path / "small.jsonl", _short(71, "s"))
    sets = [f"data.cache_dir={tmp_path / 'c'}", "data.eval_fraction=0", "data.max_seq_len=64",
            "data.tokens_per_row=256", f"data.train=[{{path: {big}, weight: 0.7}}, {{path: {small}, weight: 0.3}}]"]
    first = build_data(load_config(None, sets).data, tok, SEED)
    assert first.sources[1].drawn == 71 and first.sources[0].drawn_records < 400
    every = build_data(load_config(None, [*sets, "data.mix=all_exhausted"]).data, tok, SEED)
    big_s, small_s = every.sources
    assert (big_s.drawn_records, small_s.drawn_records) == (1116, 71)
    assert small_s.drawn > 6 * 71 and abs(small_s.drawn / (big_s.drawn + small_s.drawn) - 0.3) < 0.02
    assert len(every.train) == big_s.drawn + small_s.drawn
    assert every.digest != first.digest  # a checkpoint of one mix does not resume the other


@pytest.mark.parametrize("mix", ["first_exhausted", "all_exhausted"])
def test_a_stream_draws_what_the_table_draws(tmp_path, tok, mix):
    """The same sources as a table and as a stream (chunks of 16 records): the same draws from each
    source, the same tokens; the stream restarts a source that runs out as the table repeats it."""
    a, b = write_jsonl(tmp_path / "a.jsonl", _short(150, "a")), write_jsonl(tmp_path / "b.jsonl", _short(9, "b"))
    sets = [f"data.cache_dir={tmp_path / 'c'}", "data.eval_fraction=0", "data.max_seq_len=64",
            "data.tokens_per_row=256", f"data.mix={mix}", "data.stream_buffer=16",
            f"data.train=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 1}}]"]
    table = build_data(load_config(None, sets).data, tok, SEED)
    stream = build_data(load_config(None, [*sets, "data.streaming=true", "train.max_steps=1"]).data, tok, SEED).stream
    stats, per_source, _ = stream.scan()
    assert [d for d, *_ in per_source] == [s.drawn for s in table.sources]
    assert [t for _, _, t, _ in per_source] == [s.drawn_tokens for s in table.sources]
    assert sorted(stats.lengths) == sorted(table.train_stats.lengths)
    if mix == "all_exhausted":
        assert stream.source_sizes == [150, 9] and table.sources[1].drawn > 9 * 3
    first_pass = list(stream)
    assert list(stream) != first_pass and first_pass == list(
        build_data(load_config(None, [*sets, "data.streaming=true", "train.max_steps=1"]).data, tok, SEED).stream)


def test_a_resumed_all_exhausted_stream_continues_exactly(tmp_path, tok):
    """A position taken after a source has started again resumes with it started again."""
    a, b = write_jsonl(tmp_path / "a.jsonl", _short(120, "a")), write_jsonl(tmp_path / "b.jsonl", _short(5, "b"))
    sets = [f"data.cache_dir={tmp_path / 'c'}", "data.eval_fraction=0", "data.max_seq_len=64",
            "data.tokens_per_row=128", "data.mix=all_exhausted", "data.stream_buffer=8", "data.streaming=true", "train.max_steps=1",
            f"data.train=[{{path: {a}, weight: 1}}, {{path: {b}, weight: 1}}]"]

    def stream():
        return build_data(load_config(None, sets).data, tok, SEED).stream

    full = list(stream())
    n = len(full)
    for at in (n // 3, n - 2):
        fresh = stream()
        it = iter(fresh)
        for _ in range(at + 1):
            next(it)
        position = json.loads(json.dumps(fresh.position_at(at)))
        resumed = stream()
        resumed.resume(position)
        assert list(resumed) == full[at:], at


def test_truncations_count_only_the_records_the_mix_draws(tmp_path, tok):
    """first_exhausted leaves most of the large source out; its long (truncated) records there are
    not counted as truncated."""
    long = [{"prompt": "word " * 200 + "?", "response": "ok."} for _ in range(300)]
    a = write_jsonl(tmp_path / "a.jsonl", _short(20, "a"))
    b = write_jsonl(tmp_path / "b.jsonl", _short(20, "b") + long)
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'c'}", "data.eval_fraction=0", "data.max_seq_len=64",
                             "data.tokens_per_row=256", f"data.train=[{{path: {a}, weight: 1}}, {{path: {b}}}]"])
    data = build_data(cfg.data, tok, SEED)
    drawn_b = data.sources[1].drawn_records
    assert drawn_b < 100  # the mix ends when a's 20 records run out
    assert data.sources[1].truncated == max(0, drawn_b - 20)
    assert data.train_stats.truncated == max(0, drawn_b - 20) < 300


def _cli(capsys, *args):
    from mistral_qlora.cli import main

    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_prepare_and_the_run_log_say_how_much_of_each_source_is_used(tmp_path, capsys):
    big, small = write_jsonl(tmp_path / "big.jsonl", _short(300, "big")), write_jsonl(tmp_path / "small.jsonl", _short(20, "s"))
    sets = ["--set", f"data.cache_dir={tmp_path / 'c'}", "--set", "data.eval_fraction=0", "--set",
            "data.max_seq_len=64", "--set", "data.tokens_per_row=256", "--set",
            f"data.train=[{{path: {big}, weight: 0.7}}, {{path: {small}, weight: 0.3}}]"]
    code, out, err = _cli(capsys, "prepare", str(ROOT / "configs/tiny.yaml"), *sets, "--set", "data.mix=all_exhausted")
    assert code == 0, err
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  /")}
    assert "data.mix=all_exhausted" in out
    assert "300 of 300 kept records drawn (100%)" in lines[str(big)] and "weight 70.0%" in lines[str(big)]
    assert "20 of 20 kept records drawn (100%)" in lines[str(small)] and " repeats (" in lines[str(small)]
    code, out, err = _cli(capsys, "prepare", str(ROOT / "configs/tiny.yaml"), *sets)
    assert code == 0 and "data.mix=first_exhausted" in out and " of 300 kept records drawn (" in out
    assert "300 of 300 kept" not in out

    run = tmp_path / "run"
    code, out, err = _cli(capsys, "train", str(ROOT / "configs/tiny.yaml"), *sets, "--set", "data.mix=all_exhausted",
                          "--set", "train.max_steps=1", "--set", "eval.samples=0", "--set", f"output_dir={run}")
    assert code == 0, err
    log = (run / "run.log").read_text()
    assert "data.mix=all_exhausted" in log and "20 of 20 kept records drawn (100%)" in log
