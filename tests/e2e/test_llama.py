"""End to end through the CLI on a Llama-architecture checkpoint (no sliding window in its config,
its own ChatML template): the run finishes and leaves its artifacts."""

import json

from testkit import QA, ROOT, run_cli
from testkit.llama import build_tiny_llama


def test_train_on_a_llama_checkpoint_finishes_with_every_artifact(tmp_path):
    model = build_tiny_llama(tmp_path / "tiny-llama")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": q, "response": a}) + "\n" for q, a in QA * 4))
    out = tmp_path / "run"
    res = run_cli("train", str(ROOT / "configs/tiny.yaml"), "--set", f"model.name_or_path={model}",
                  "--set", f"data.train={data}", "--set", "train.max_steps=3", "--set", "train.eval_steps=3",
                  "--set", "train.save_steps=3", "--set", "train.logging_steps=1", "--set", "eval.samples=1",
                  "--set", "eval.max_new_tokens=4", "--set", "data.tokens_per_row=128", "--set", "data.max_seq_len=128",
                  "--set", "train.report_to=[]", "--set", f"output_dir={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["sliding_window"] is None
    assert (out / "loss.png").is_file() and (out / "samples.md").is_file()
    assert "chat template: tokenizer" in res.stderr and "no recognisable end of turn" not in res.stderr
    assert "the base's matmuls in float32," in res.stderr  # the CPU computes in float32
    assert summary["peak_memory_of"] == "host" and "GiB (host RSS)" in res.stdout and "n/a GiB" not in res.stdout
