"""The model card (run/model_card.py): hub front matter, the run's settings and outcome, usage.
The card of a real tiny run and of its merge: tests/tools/test_merge.py."""

import json

import yaml

from mistral_qlora.run.model_card import base_license, front_matter, model_card, write_model_card

CONFIG = {
    "model": {"name_or_path": "mistralai/Mistral-7B-Instruct-v0.2"},
    "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute": "bf16"},
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
    "data": {"train": [{"path": "HuggingFaceH4/no_robots", "weight": 3.0}, {"path": "data/local.jsonl", "weight": 1.0}],
             "template": "auto", "max_seq_len": 2048, "tokens_per_row": 4096, "packing": True,
             "mix": "first_exhausted"},
    "train": {"learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.03, "micro_batch_size": 1,
              "grad_accum": 8, "seed": 42, "run_name": "no-robots-r16"},
    "output_dir": "runs/x",
}
SUMMARY = {
    "initial_eval_loss": 1.8765, "final_eval_loss": 1.2345, "initial_eval_perplexity": 6.53,
    "final_eval_perplexity": 3.437, "steps": 321, "epochs": 2.0, "train_tokens": 1234567, "world_size": 2,
    "lora_variants": ["rsLoRA"], "template": "mistral-v1",
    "sources": [{"name": "HuggingFaceH4/no_robots", "hub": True, "weight": 0.75, "records": 9500, "kept": 9400,
                 "drawn": 9000, "share": 0.9},
                {"name": "data/local.jsonl", "hub": False, "weight": 0.25, "records": 1000, "kept": 1000,
                 "drawn": 1000, "share": 0.1}],
}


def test_front_matter_is_hub_yaml_with_base_library_license_tags_and_hub_datasets():
    card = model_card("adapter", "mistralai/Mistral-7B-Instruct-v0.2", None, CONFIG, SUMMARY, "apache-2.0",
                      "no-robots-r16")
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta == front_matter(card)
    assert meta["base_model"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"mistral-qlora", "qlora", "lora", "mistral-v1"} <= set(meta["tags"])
    assert meta["datasets"] == ["HuggingFaceH4/no_robots"]  # the local file is no hub id
    merged = front_matter(model_card("merged", "mistralai/Mistral-7B-Instruct-v0.2", None, CONFIG, SUMMARY))
    assert merged["library_name"] == "transformers" and "license" not in merged and "merged" in merged["tags"]


def test_base_that_is_no_hub_id_stays_out_of_the_front_matter_but_in_the_text():
    card = model_card("adapter", "tiny-random-mistral", None, CONFIG, SUMMARY)
    assert "base_model" not in front_matter(card) and "`tiny-random-mistral`" in card


def test_body_names_the_settings_sources_losses_and_how_to_load_it():
    card = model_card("adapter", "mistralai/Mistral-7B-Instruct-v0.2", None, CONFIG, SUMMARY)
    for text in ("r=16, alpha=32", "all-linear", "rsLoRA", "4-bit nf4, double quantization", "2,048 / 4,096 (packed)",
                 "| steps | 321 |", "| training tokens | 1,234,567 |", "0.0002 (cosine", "1 x 8 accumulated x 2",
                 "| `HuggingFaceH4/no_robots` | 75.0% | 9,400 | 9,000 | 90.0% |",
                 "| eval loss | 1.877 | 1.234 |", "PeftModel.from_pretrained", "mistral-qlora merge",
                 "--format gguf-lora", "ollama create"):
        assert text in card, text
    assert "## Benchmarks" not in card


def test_benchmark_scores_in_the_summary_become_a_table_whatever_their_key():
    nested = model_card("adapter", "b", None, CONFIG, {**SUMMARY, "eval_tasks": {
        "arc_easy": {"acc": 0.61, "acc_norm": 0.58}, "hellaswag": {"acc": 0.43}}})
    assert "## Benchmarks" in nested
    assert "| task | acc | acc_norm |" in nested and "| arc_easy | 0.61 | 0.58 |" in nested
    assert "| hellaswag | 0.43 | n/a |" in nested
    rows = model_card("adapter", "b", None, CONFIG, {**SUMMARY, "benchmarks": [{"task": "mmlu", "acc": 0.5}]})
    assert "| task | acc |" in rows and "| mmlu | 0.5 |" in rows


def test_license_comes_from_the_base_readme_front_matter_else_its_config_else_none(tmp_path):
    assert base_license(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"license": "mit"}))
    assert base_license(str(tmp_path)) == "mit"
    (tmp_path / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# base\n")
    assert base_license(str(tmp_path)) == "apache-2.0"


def test_an_adapter_outside_a_run_folder_gets_a_card_from_its_adapter_config(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["v_proj", "q_proj"], "use_dora": True,
        "base_model_name_or_path": "org/base"}))
    card = write_model_card(adapter, "adapter", adapter, "org/base", None).read_text()
    assert front_matter(card)["base_model"] == "org/base"
    assert "r=8, alpha=16" in card and "q_proj, v_proj" in card and "DoRA" in card
    assert "## Evaluation" not in card  # no summary: nothing to report
