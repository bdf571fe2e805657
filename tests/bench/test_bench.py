"""`mistral-qlora bench` on the CPU with the tiny model (a few steps), and the random 7B builder."""

from __future__ import annotations

import json

import pytest
import torch

from mistral_qlora.bench import profile as P
from mistral_qlora.bench import recipes as B
from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.bench.report import format_report
from mistral_qlora.bench.run import run_bench
from mistral_qlora.model import builtin as R


def _small_opts(tmp_path, **kw):
    opts = dict(median=48, max_len=160, min_len=16, sequences=200, tokens_per_row=320, padded_batch_size=4,
                warmup=1, timed_rows=2, lora_r=4, out=str(tmp_path / "bench.json"))
    opts.update(kw)
    return BenchOptions(**opts)


def test_bench_on_cpu_times_the_tutorial_recipe_and_packed_rows_on_the_same_sequences(tmp_path):
    report = run_bench(_small_opts(tmp_path, recipes=[B.TUTORIAL_RECIPE, "packed+sdpa"], repeats=1))
    results = {r["recipe"]: r for r in report["results"]}
    assert list(results) == [B.TUTORIAL_RECIPE, "packed+sdpa"]
    tutorial, packed = results[B.TUTORIAL_RECIPE], results["packed+sdpa"]
    assert tutorial["error"] is None and packed["error"] is None
    # Same useful work: the padded recipe trains on exactly the timed rows' sequences.
    assert tutorial["real_tokens"] == packed["real_tokens"] > 0
    assert packed["steps"] == 2 and tutorial["steps"] == -(-report["timed_sequences"] // 4)
    assert packed["padding_fraction"] == 0 and tutorial["padding_fraction"] > 0
    assert tutorial["vs_tutorial"] == 1.0 and packed["vs_tutorial"] == pytest.approx(
        packed["tokens_per_second"] / tutorial["tokens_per_second"])
    assert all(r["tokens_per_second"] > 0 and r["mean_loss"] > 0 for r in results.values())
    assert tutorial["kbit_setup"] == "prepare_model_for_kbit_training" and packed["kbit_setup"] == "ours"
    assert report["packing_efficiency"] > 0.9
    # each pass's figure is rounded to 0.1 tokens/s (a loaded CPU runs at tens of tokens/s)
    assert all(r["repeat_tokens_per_second"] == [pytest.approx(r["tokens_per_second"], rel=1e-3, abs=0.05)]
               for r in results.values())
    assert json.loads((tmp_path / "bench.json").read_text())["results"] == report["results"]
    table = format_report(report)
    assert "| padded+sdpa (tutorial)" in table and "| packed+sdpa" in table and "1.00x" in table


def test_bench_repeats_report_the_median_pass(tmp_path):
    report = run_bench(_small_opts(tmp_path, recipes=["packed+sdpa"], repeats=3))
    (r,) = report["results"]
    assert len(r["repeat_tokens_per_second"]) == 3
    assert r["tokens_per_second"] == pytest.approx(sorted(r["repeat_tokens_per_second"])[1], rel=1e-3, abs=0.05)
    assert "timed 3 times (median)" in format_report(report)


def test_bench_default_recipes_on_cpu_and_refusals(tmp_path):
    from mistral_qlora.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("CPU expectations")
    assert B.default_recipes(torch.float32) == [B.TUTORIAL_RECIPE, "packed+sdpa"]
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        run_bench(_small_opts(tmp_path, recipes=["packed+varlen"]))
    with pytest.raises(UserError, match="unknown"):
        run_bench(_small_opts(tmp_path, recipes=["packed+magic"]))
    with pytest.raises(UserError, match="random:mistral-7b"):
        run_bench(_small_opts(tmp_path, model="random:llama"))


def test_recipe_names():
    from mistral_qlora.errors import UserError

    ours = B.Recipe.parse("packed+varlen+liger+ckpt=auto")
    assert (ours.attention, ours.kernels, ours.ckpt, ours.lora, ours.kbit_setup) == \
        ("varlen", "liger", "auto", "fused", "ours")
    assert B.Recipe.parse("packed+sdpa+lora=peft").lora == "peft"
    assert B.Recipe.parse("packed+sdpa+ckpt=0.25").ckpt == "0.25"
    assert B.Recipe.parse(B.PLAIN_RECIPE).lora == B.Recipe.parse(B.TUTORIAL_RECIPE).lora == "peft"
    with pytest.raises(UserError, match="lora=fused\\|peft"):
        B.Recipe.parse("packed+sdpa+lora=magic")
    fp8 = B.Recipe.parse("packed+varlen+liger+ckpt=auto+fp8")
    assert fp8.compute == "fp8" and ours.compute == "bf16"
    assert B.recipe_config(fp8, BenchOptions(), "m").quantization.compute == "fp8"
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="fp8 needs a CUDA GPU"):
            B.Recipe.parse("packed+sdpa+fp8").check_usable(torch.float32)


def test_random_mistral_builder(tmp_path):
    """The random:mistral-7b path, on a shrunken copy of the architecture: built once, then reused."""
    from transformers import AutoConfig

    assert R.MISTRAL_7B_V02["hidden_size"] == 4096 and R.MISTRAL_7B_V02["num_key_value_heads"] == 8
    assert R.MISTRAL_7B_V02["sliding_window"] is None and R.MISTRAL_7B_V02["rope_theta"] == 1e6
    small = dict(R.MISTRAL_7B_V02, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512)
    path = R.ensure_random_7b(str(tmp_path / "r7b"), arch=small)
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.num_key_value_heads == 2 and cfg.sliding_window is None and (path / "tokenizer.model").is_file()
    assert cfg.dtype == torch.bfloat16
    stamp = (path / "config.json").stat().st_mtime_ns
    assert R.ensure_random_7b(str(tmp_path / "r7b")) == path  # already there: not rebuilt
    assert (path / "config.json").stat().st_mtime_ns == stamp


def test_bench_cli(tmp_path, capsys):
    from mistral_qlora.cli import main

    out = tmp_path / "b.json"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--median", "48", "--max-len", "160", "--sequences", "120", "--tokens-per-row", "320",
              "--warmup", "1", "--timed-rows", "1", "--lora-r", "4", "--recipes", "tutorial,packed+sdpa",
              "--out", str(out)])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "real tok/s" in printed and "packed+sdpa" in printed
    assert [r["recipe"] for r in json.loads(out.read_text())["results"]] == [B.TUTORIAL_RECIPE, "packed+sdpa"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bench_every_usable_backend_on_the_gpu(tmp_path):
    """Smoke run on the GPU with the tiny model: every usable backend trains without error."""
    report = run_bench(_small_opts(tmp_path, median=256, max_len=1024, sequences=600, tokens_per_row=2048,
                                     warmup=2, timed_rows=2))
    recipes = [r["recipe"] for r in report["results"]]
    assert recipes == B.default_recipes(torch.bfloat16)
    assert "packed+varlen" in recipes
    for r in report["results"]:
        assert r["error"] is None, r
        assert r["peak_memory_gib"] > 0
    print(format_report(report))


def test_report_prints_the_profile_with_idle_time_and_the_longest_kernels(tmp_path):
    report = run_bench(_small_opts(tmp_path, recipes=["packed+sdpa"], repeats=1))
    report["results"][0]["profile"] = {"matmul (bf16 GEMM)": {"ms": 300.0, "share": 0.75},
                                       P.IDLE_KIND: {"ms": 100.0, "share": 0.25}}
    report["results"][0]["profile_kernels"] = [{"kernel": "nvjet_sm90_gemm", "kind": "matmul (bf16 GEMM)",
                                                "ms": 300.0, "calls": 224}]
    report["results"][0]["profile_gpu_clocks"] = {"sm_clock_mhz": 1965.0, "sm_clock_max_mhz": 1980.0,
                                                  "power_w": 520.0, "power_limit_w": 700.0, "slowed_by": {}}
    table = format_report(report)
    assert "spends its GPU time (at 1,965 MHz of 1,980, 520 W of 700):" in table
    assert "GPU idle (host launch gaps, syncs)" in table and "25.0%" in table
    assert "the kernels that took longest" in table and "224x  nvjet_sm90_gemm" in table


def test_compare_times_each_lever_off_against_the_plan_in_turns(tmp_path, capsys):
    """`bench --compare`: one model, the variants' passes interleaved, a row per variant."""
    from mistral_qlora.bench.compare import AS_PLANNED, run_compare
    from mistral_qlora.bench.report import format_compare
    from mistral_qlora.cli import main

    report = run_compare(_small_opts(tmp_path, recipes=["packed+sdpa"], repeats=2),
                         ["shared-input-grad", "kept-weights"])
    variants = {v["variant"]: v for v in report["variants"]}
    assert list(variants) == [AS_PLANNED, "without shared-input-grad", "without kept-weights"]
    assert variants[AS_PLANNED]["vs_planned"] == 1.0 and variants["without kept-weights"]["off"] == ["kept-weights"]
    assert all(len(v["passes"]) == 2 and v["tokens_per_second"] > 0 and v["mean_loss"] > 0 for v in variants.values())
    assert report["recipe"] == "packed+sdpa" and json.loads((tmp_path / "bench.json").read_text()) == report
    table = format_compare(report)
    assert "| without shared-input-grad" in table and "vs planned" in table
    # Each variant's clock is pooled over its own passes (none on the CPU).
    assert all(v["gpu_clocks"] is None for v in variants.values()) or torch.cuda.is_available()
    report["variants"][1]["gpu_clocks"] = {"sm_clock_mhz": 1650.0, "sm_clock_max_mhz": 1980.0, "power_w": 698.0,
                                           "power_limit_w": 700.0, "slowed_by": {"power cap": 0.9}}
    assert "without shared-input-grad    1,650 MHz of 1,980, 698 W of 700 (power cap 90%)" in format_compare(report)

    for argv, message in ((["--compare", "faster"], "--compare faster: name levers to switch off"),
                          (["--compare", "kept-weights", "--recipes", "seed"], "needs a recipe of ours")):
        with pytest.raises(SystemExit) as exc:
            main(["bench", "--median", "48", "--max-len", "160", "--sequences", "120", "--tokens-per-row", "320",
                  "--out", str(tmp_path / "x.json"), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow  # a train process per strategy
def test_strategies_run_train_itself_once_per_strategy(tmp_path, capsys):
    """`bench --strategies`: each strategy trains through `mistral-qlora train` in its own process;
    the table gives its tokens/s, peak memory and what `auto`'s estimate assumes."""
    from mistral_qlora.cli import main

    out = tmp_path / "strategies.json"
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--strategies", "single", "--steps", "2", "--tokens-per-row", "512",
              "--work-dir", str(tmp_path / "work"), "--out", str(out)])
    assert exc.value.code == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["strategy"] == "single" and r["steps"] == 2 and r["world_size"] == 1 and r["tokens_per_second_run"] > 0
    assert "train.strategy=single" in r["strategy_line"] and r["estimated_gib"] > 0
    assert (tmp_path / "work" / "single" / "summary.json").is_file()
    assert "| single | n/a |" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--strategies", "zero4", "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and "strategies from single, ddp, zero2, zero3, zero3_offload" in capsys.readouterr().err


def test_fast_path_variant_recipes(tmp_path):
    """`fast`, `fast-rslora`, `fast-dora`: the fastest default recipe with each LoRA variant, in one
    bench run (on the CPU the fastest is packed+sdpa), each its own model; DoRA on PEFT's layer."""
    from mistral_qlora.config import ModelSection
    from mistral_qlora.errors import UserError
    from mistral_qlora.model.base import load_model_config, resolve_model_path
    from mistral_qlora.runtime import Runtime

    assert B.expand_recipes(["fast", "fast-rslora", "fast-dora", "tutorial"], torch.float32) == \
        ["packed+sdpa", "packed+sdpa+rslora", "packed+sdpa+dora", "tutorial"]
    assert B.expand_recipes(["fast-dora"], torch.bfloat16)[0].endswith("+dora")
    assert B.Recipe.parse("packed+varlen+liger+ckpt=auto+rslora").variant == "rslora"
    with pytest.raises(UserError, match="rslora or dora"):
        B.Recipe.parse("packed+sdpa+rslora+dora")
    opts = _small_opts(tmp_path, recipes=["fast", "fast-rslora"], repeats=1, timed_rows=1, sequences=60,
                       tokens_per_row=160, max_len=128)
    report = run_bench(opts)
    assert [(r["recipe"], r["variant"], r["lora"]) for r in report["results"]] == \
        [("packed+sdpa", "lora", "fused"), ("packed+sdpa+rslora", "rslora", "fused")]
    assert all(r["tokens_per_second"] and r["error"] is None for r in report["results"])
    path = resolve_model_path("tiny-random-mistral")
    model, plan = B.build_recipe_model(B.Recipe.parse("packed+sdpa+dora"), opts, path,
                                       load_model_config(path, ModelSection()), Runtime.detect("float32"), 0)
    assert plan.layers.lora_layer == "peft" and "DoRA" in plan.why["lora_layer"]
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
