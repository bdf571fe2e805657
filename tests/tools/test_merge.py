"""Merge: the adapter folded into a 16-bit base gives the adapter model's logits."""


import pytest
import torch

from testkit import run_cli, train_tiny


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    _, run = train_tiny(tmp_path_factory.mktemp("merge"), [
        "data.max_seq_len=128", "data.tokens_per_row=128", "train.max_steps=12", "train.eval_steps=1000",
        "eval.samples=0"], records=40)
    return run / "adapter"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_merged_model_equals_adapter_on_16bit_base(adapter, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.tools.merge import merge_adapter

    out = merge_adapter(str(adapter), str(tmp_path / "merged"), dtype="bf16")
    assert sorted(p.name for p in out.glob("*.safetensors"))
    assert (out / "tokenizer_config.json").is_file() and (out / "config.json").is_file()
    assert not list(tmp_path.glob(".merged*"))  # no staging folder left behind

    base_path = resolve_model_path("tiny-random-mistral")
    ids = torch.tensor([[1, 733, 16289, 28793, 1824, 349, 264, 307, 1068, 28804, 733, 28748, 16289, 28793]])
    plain = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    base_logits = _logits(plain, ids)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16),
                                             str(adapter))
    adapter_logits = _logits(with_adapter, ids)
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16), ids)

    tolerance = 0.05 * adapter_logits.abs().max().item()  # bf16: 8 bits of mantissa, summed over layers
    assert (merged_logits - adapter_logits).abs().max().item() < tolerance
    # and the adapter matters: without it the logits are far off
    assert (base_logits - adapter_logits).abs().max().item() > 4 * tolerance


def test_merge_replaces_an_existing_output_only_with_overwrite_and_only_once_written(adapter, tmp_path, capsys,
                                                                                    monkeypatch):
    from mistral_qlora.cli import main
    from mistral_qlora.tools import merge

    def cli(*args):
        with pytest.raises(SystemExit) as info:
            main(["merge", "--adapter", str(adapter), "--output", str(out), *args])
        return info.value.code, capsys.readouterr().err

    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, err = cli()
    assert code == 2 and err.strip() == (f"mistral-qlora: error: --output {out}: folder exists and is not empty; "
                                         "choose a new folder or pass --overwrite to replace it")
    # a failure while writing the new model leaves the old output whole, and no staging folder
    real = merge.load_tokenizer

    class Failing:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    monkeypatch.setattr(merge, "load_tokenizer", lambda src: Failing())
    with pytest.raises(RuntimeError, match="disk full"):
        main(["merge", "--adapter", str(adapter), "--output", str(out), "--overwrite"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"] and (out / "old.txt").read_text() == "old"
    monkeypatch.setattr(merge, "load_tokenizer", real)
    code, err = cli("--overwrite")
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "config.json").is_file() and list(out.glob("*.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.slow  # generate and merge as processes of their own
def test_generate_with_the_merged_model_and_merge_refuses_a_full_folder(adapter, tmp_path):
    merged = tmp_path / "merged"
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(merged))
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("generate", "--model", str(merged), "--bits", "16", "--prompt", "What is a noun?",
                   "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("[INST] What is a noun? [/INST]")
    proc = run_cli("merge", "--adapter", str(adapter), "--output", str(merged))
    assert proc.returncode == 2 and "folder exists and is not empty" in proc.stderr


def test_the_run_and_its_merge_carry_model_cards_with_its_steps_and_eval_losses(adapter, tmp_path):
    import json

    from mistral_qlora.run.model_card import front_matter
    from mistral_qlora.tools.merge import merge_adapter

    summary = json.loads((adapter.parent / "summary.json").read_text())
    assert summary["initial_eval_loss"] is not None and summary["final_eval_loss"] is not None
    card = (adapter / "README.md").read_text()  # the run's own card, not PEFT's stub
    meta = front_matter(card)
    assert meta["library_name"] == "peft" and "base_model" not in meta  # tiny-random-mistral: no hub id
    assert {"mistral-qlora", "qlora", "mistral-v1"} <= set(meta["tags"])
    assert f"| steps | {summary['steps']} |" in card and summary["steps"] == 12
    assert f"| eval loss | {summary['initial_eval_loss']:.4g} | {summary['final_eval_loss']:.4g} |" in card
    assert f"`{summary['sources'][0]['name']}` | 100.0% |" in card and summary["template"] == "mistral-v1"

    out = merge_adapter(str(adapter), str(tmp_path / "merged"), dtype="bf16")
    merged = (out / "README.md").read_text()
    assert front_matter(merged)["library_name"] == "transformers"
    assert f"| eval loss | {summary['initial_eval_loss']:.4g} | {summary['final_eval_loss']:.4g} |" in merged
