"""`bench --method dpo|orpo` (bench/preference.py): ours and TRL's trainers on the same pairs, on the CPU."""

from __future__ import annotations

import pytest

from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.bench.preference import check_recipes, format_preference_report, run_preference_bench, synthetic_pairs
from mistral_qlora.errors import UserError

TINY = dict(sequences=48, median=24, max_len=32, min_len=4, tokens_per_row=128, warmup=1, timed_rows=1)


def test_both_sides_train_the_same_pair_tokens():
    sample = synthetic_pairs(BenchOptions(**TINY), vocab_size=1000)
    ours = sample.ours()
    assert sorted(i for row in sample.rows for i in row) == list(range(len(sample.pairs)))
    for p, o in zip(sample.pairs, ours):
        for side in ("chosen", "rejected"):
            assert o[f"{side}_ids"] == p["prompt_ids"] + p[f"{side}_ids"]
            scored = [t for t in o[f"{side}_labels"] if t != -100]
            assert scored == p[f"{side}_ids"]
    assert sample.pairs_per_batch == round(len(sample.pairs) / len(sample.rows))


def test_the_padded_sft_baselines_are_refused_for_a_preference_bench():
    assert check_recipes(None, "dpo") == ["trl", "fast"]
    for name in ("tutorial", "plain"):
        with pytest.raises(UserError, match="padded baseline of a preference run is TRL's trainer"):
            check_recipes([name], "dpo")


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_preference_bench_times_ours_and_trls_trainer_on_the_cpu(method):
    pytest.importorskip("trl")
    report = run_preference_bench(BenchOptions(**TINY, recipes=["trl", "packed+sdpa"]), method)
    results = {r["recipe"]: r for r in report["results"]}
    trl_names = (["trl (precompute_ref_log_probs=true)", "trl (precompute_ref_log_probs=false)"]
                 if method == "dpo" else ["trl"])
    assert list(results) == trl_names + ["packed+sdpa"]
    for r in results.values():
        assert r["error"] is None, r["error"]
        assert r["steps"] >= 1 and r["real_tokens"] > 0 and r["tokens_per_second"] > 0
    ours = results["packed+sdpa"]
    # ours trains every token of its timed row: prompt + answer of both records of each pair
    assert ours["vs_trl"] > 0
    assert (ours["reference_seconds"] is not None) == (method == "dpo")
    if method == "dpo":
        assert results[trl_names[0]]["reference_seconds"] is not None
    assert method.upper() in format_preference_report(report)
