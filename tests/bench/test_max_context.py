"""`bench --max-context`'s search on the CPU with a fake probe: doubling, then bisection to the
granularity, the fewest probes, and the edge cases (nothing fits, everything fits)."""

import pytest

from mistral_qlora.bench.max_context import Probe, longest_fitting, markdown_table


def fake(longest: int):
    calls = []

    def probe(n):
        calls.append(n)
        return Probe(n, n <= longest, peak_gib=n / 1000, tokens_per_s=1000.0)
    return probe, calls


@pytest.mark.parametrize("longest,start", [(50_000, 4096), (50_000, 200_000), (4096, 4096), (300, 8192)])
def test_search_finds_the_longest_fitting_length_to_the_granularity(longest, start):
    probe, calls = fake(longest)
    best, runs = longest_fitting(probe, start, granularity=256, limit=1 << 20)
    assert best.fits and best.tokens <= longest < best.tokens + 256
    assert [r.tokens for r in runs] == calls and len(calls) == len(set(calls))  # no length probed twice
    assert len(calls) <= 2 * 12  # logarithmic: doubling/halving plus bisection


def test_search_edge_cases():
    probe, _ = fake(100)
    assert longest_fitting(probe, 4096, granularity=256, limit=1 << 20)[0] is None
    probe, calls = fake(10**9)
    best, _ = longest_fitting(probe, 4096, granularity=256, limit=65536)
    assert best.tokens == 65536 and calls == [4096, 8192, 16384, 32768, 65536]


def test_markdown_table_lists_each_budget():
    table = markdown_table({16: Probe(40_960, True, 15.2, 2100.0), 8: None})
    assert "| 16 GiB | 40,960 | 15.2 GiB | 2,100 |" in table and "| 8 GiB | none fits |" in table


def test_search_with_a_growth_factor_and_a_probe_cap():
    probe, calls = fake(50_000)
    best, _ = longest_fitting(probe, 40_000, granularity=1024, limit=1 << 20, growth=1.25)
    assert best.tokens <= 50_000 < best.tokens + 1024 and calls[:2] == [39_936, 49_152]
    probe, calls = fake(50_000)
    best, runs = longest_fitting(probe, 40_000, granularity=256, limit=1 << 20, growth=1.25, max_probes=3)
    assert len(calls) == 3 and best == max((r for r in runs if r.fits), key=lambda r: r.tokens)


def test_max_context_refuses_in_one_line_without_a_gpu(monkeypatch, capsys):
    import torch

    from mistral_qlora.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MISTRAL_QLORA_FAKE_TOKENS_PER_GIB", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--max-context", "--budgets", "16,24"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0]


@pytest.mark.slow
def test_max_context_cli_runs_each_probe_in_a_child_process_under_a_fake_budget(tmp_path, monkeypatch, capsys):
    """The CLI end to end on the CPU: the tiny model, one budget of 2 GiB that a fake cap of 100
    tokens a GiB limits to 200 tokens; from the 256-token seed (the limit) one probe fails, the
    next fits, and the report says so with the plan's choices and the child's measurements."""
    import json

    from mistral_qlora.cli import main

    monkeypatch.setenv("MISTRAL_QLORA_FAKE_TOKENS_PER_GIB", "100")
    out = tmp_path / "max.json"
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "--max-context", "--budgets", "2", "--max-tokens", "256", "--granularity", "128",
              "--growth", "2", "--lora-r", "4", "--recipes", "packed+sdpa+lora=peft", "--out", str(out)])
    assert exit_.value.code == 0
    report = json.loads(out.read_text())
    (budget,) = report["budgets"]
    assert [(p["tokens"], p["fits"]) for p in budget["probes"]] == [(256, False), (128, True)]
    assert budget["longest"]["tokens"] == 128 and budget["first_failing"] == 256
    best = budget["longest"]
    assert best["tokens_per_s"] > 0 and best["timed_step_s"] > 0 and best["host_gib"] > 0
    assert best["recompute"] == 4 and best["offload"] is False and best["estimate_gib"] > 0
    assert "out of memory" in budget["probes"][0]["error"]
    printed = capsys.readouterr().out
    assert "| 2 GiB | 128 |" in printed and "| 256 |" in printed
