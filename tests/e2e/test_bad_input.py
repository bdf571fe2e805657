"""Bad inputs beyond the data and config: each one clear line, exit code 2, no checkpoint damaged."""

import json
import shutil
from pathlib import Path

import pytest

from mistral_qlora.cli import main

from testkit import ROOT, story_records


def cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory):
    """A run stopped after its checkpoints (summary removed): what a preempted run leaves."""
    from mistral_qlora.config import load_config
    from mistral_qlora.train import run_training

    tmp = tmp_path_factory.mktemp("bad")
    data = tmp / "qa.json"
    data.write_text(json.dumps(story_records(40)))
    sets = [f"data.train={data}", "data.max_seq_len=128", "data.tokens_per_row=128", "train.max_steps=6",
            "train.save_steps=2", "train.keep_checkpoints=3", "train.eval_steps=1000", "eval.samples=0",
            f"output_dir={tmp / 'run'}"]
    run_training(load_config(ROOT / "configs/tiny.yaml", sets))
    (tmp / "run/summary.json").unlink()
    return tmp, sets


def _copy_of(unfinished_run, tmp_path) -> tuple[Path, list[str]]:
    """A private copy of the unfinished run, and the settings that point at it."""
    tmp, sets = unfinished_run
    run = tmp_path / "run"
    shutil.copytree(tmp / "run", run)
    return run, [s if not s.startswith("output_dir=") else f"output_dir={run}" for s in sets]


def _train(capsys, sets, *extra):
    args = ["train", str(ROOT / "configs/tiny.yaml")]
    for s in sets:
        args += ["--set", s]
    return cli(capsys, *args, *extra)


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(unfinished_run, capsys, tmp_path):
    run, sets = _copy_of(unfinished_run, tmp_path)
    newest = run / "checkpoints/checkpoint-6/adapter_model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte
    newest.write_bytes(bytes(data))
    code, out, err = _train(capsys, sets)
    assert code == 0
    assert "skipping checkpoint" in err and "checkpoint-6: adapter_model.safetensors does not match its checksum" in err
    assert "resuming from" in err and "checkpoint-4" in err
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_explicit_corrupt_checkpoint_is_refused_and_left_alone(unfinished_run, capsys, tmp_path):
    run, sets = _copy_of(unfinished_run, tmp_path)
    ckpt = run / "checkpoints/checkpoint-4"
    size = (ckpt / "optimizer.pt").stat().st_size
    (ckpt / "optimizer.pt").write_bytes(b"truncated")
    before = _snapshot(run)
    code, out, err = _train(capsys, sets, "--set", f"train.resume={ckpt}")
    assert code == 2
    assert err.strip() == (f"mistral-qlora: error: train.resume='{ckpt}': checkpoint is incomplete or corrupt: "
                           f"optimizer.pt has 9 bytes, expected {size}")
    assert _snapshot(run) == before


def test_resume_with_a_changed_run_is_refused_unless_forced(unfinished_run, capsys, tmp_path):
    run, sets = _copy_of(unfinished_run, tmp_path)
    before = _snapshot(run)
    code, _, err = _train(capsys, sets, "--set", "lora.r=8")
    assert code == 2 and "it was made with a different lora" in err and "'r': 16" in err
    code, _, err = _train(capsys, sets, "--set", "data.max_seq_len=100", "--set", "data.tokens_per_row=100")
    assert code == 2 and "refusing to resume" in err and "pass --force" in err
    assert _snapshot(run) == before
    code, _, err = _train(capsys, sets, "--set", "train.micro_batch_size=2", "--force")
    assert code == 0 and "because of --force" in err


def test_adapter_for_another_base_is_refused(unfinished_run, capsys, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    from mistral_qlora.model.builtin import TINY_CONFIG
    from mistral_qlora.model.tokenizer import write_mistral_v1_tokenizer

    tmp, _ = unfinished_run
    other = tmp_path / "other-base"
    MistralForCausalLM(MistralConfig(**dict(TINY_CONFIG, hidden_size=128, head_dim=16))).save_pretrained(other)
    write_mistral_v1_tokenizer(other)
    adapter = tmp / "run/checkpoints/checkpoint-6"
    capsys.readouterr()
    code, _, err = cli(capsys, "generate", "--adapter", str(adapter), "--model", str(other), "--prompt", "Hi")
    (line,) = [x for x in err.splitlines() if x.startswith("mistral-qlora: error:")]
    assert code == 2 and "Traceback" not in err
    assert f"adapter {adapter} does not fit base model '{other}'" in line and "size mismatch" in line
    code, _, err = cli(capsys, "merge", "--adapter", str(adapter), "--model", str(other),
                       "--output", str(tmp_path / "merged"))
    assert code == 2 and "does not fit base model" in err
    assert not (tmp_path / "merged").exists()


def test_every_record_too_long(tmp_path, capsys):
    data = tmp_path / "long.json"
    data.write_text(json.dumps([{"text": f"<s>[INST] {'why ' * 300}? [/INST] {'because ' * 300} </s>"}] * 5))
    code, _, err = _train(capsys, [f"data.train={data}", "data.overlong=drop", f"output_dir={tmp_path / 'out'}"])
    assert code == 2
    assert "every one of 4 training records is longer than data.max_seq_len=512 tokens and was dropped" in err
    assert not (tmp_path / "out").exists()


def test_more_processes_than_gpus(tmp_path, capsys, monkeypatch):
    from mistral_qlora import relaunch

    real = relaunch.check_gpus
    monkeypatch.setattr(relaunch, "check_gpus", lambda spec, visible=None: real(spec, visible=1))
    code, _, err = _train(capsys, [f"output_dir={tmp_path / 'out'}"], "--nproc", "4")
    assert code == 2
    assert err.strip() == ("mistral-qlora: error: --nproc 4 asks for 4 GPUs on this node but 1 is visible; "
                           "use --nproc 1 or fewer")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir(capsys):
    code, _, err = _train(capsys, ["output_dir=/proc/mistral-qlora-run"])
    assert code == 2 and err.startswith("mistral-qlora: error: output_dir='/proc/mistral-qlora-run' is not writable")


def test_nan_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    import torch
    from transformers import MistralForCausalLM

    data = tmp_path / "qa.json"
    data.write_text(json.dumps(story_records(40)))
    original = MistralForCausalLM.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training step
                out.loss = out.loss * torch.tensor(float("nan"))
        return out

    monkeypatch.setattr(MistralForCausalLM, "forward", poisoned)
    out = tmp_path / "run"
    code, _, err = _train(capsys, [f"data.train={data}", "data.max_seq_len=128", "data.tokens_per_row=128",
                                   "train.max_steps=12", "train.save_steps=2", "train.logging_steps=1",
                                   "train.eval_steps=1000", "eval.samples=0", "train.keep_checkpoints=10",
                                   f"output_dir={out}"])
    assert code == 2
    assert "training diverged: loss is nan at step 5" in err and "checkpoint-4" in err
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "summary.json").exists() and not (out / "adapter").exists()


def test_cuda_out_of_memory_is_one_line_with_what_to_lower(tmp_path, capsys, monkeypatch):
    import torch
    from transformers import MistralForCausalLM

    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data = tmp_path / "qa.json"
    data.write_text(json.dumps(story_records(20)))
    monkeypatch.setattr(MistralForCausalLM, "forward", oom)
    code, _, err = _train(capsys, [f"data.train={data}", "eval.samples=0", f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("mistral-qlora: error:")]
    assert "CUDA out of memory while training" in line and "lower data.tokens_per_row (now 512)" in line
    assert "train.strategy=zero3" in line
