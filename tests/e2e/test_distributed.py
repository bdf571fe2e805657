"""Real multi-process runs of the tiny config on the CPU (gloo; DeepSpeed's CPU accelerator).

Every run here trains the same 6 steps on the same data with the same global batch (2 packed rows a
step) and dropout 0, so all of them must end with the same adapter as the one-process run:
  - DDP, started by plain torchrun (`python -m mistral_qlora train` under a launcher, strategy auto)
  - ZeRO-2 and ZeRO-3, started by `mistral-qlora train --nproc 2` (accelerate launch + launch/*.yaml)
  - two "nodes" on this machine: two launch/train.sh invocations, node ranks 0 and 1
Each rank writes what it saw (engine, partitions, rows read) through MISTRAL_QLORA_DIST_STATS, which
tests/instrument/sitecustomize.py reads in every process of the run (nothing in the package knows).
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from mistral_qlora.model.adapter import adapter_tensors, check_adapter
from mistral_qlora.model.builtin import TINY_CONFIG
from mistral_qlora.runtime import free_port

from testkit import ROOT, TESTKIT

pytestmark = pytest.mark.slow

STEPS = 6


def _write_dataset(path: Path) -> None:
    rng = random.Random(0)
    records = []
    for _ in range(120):
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        records.append({"text": f"<s>[INST] What is {a} plus {b}? Explain how you add them. [/INST] "
                                f"{a} plus {b} is {a + b}. We add the ones first and then the tens, carrying over "
                                f"when the ones make more than nine. So the answer is {a + b}. </s>"})
    path.write_text(json.dumps(records))


def _expected_adapter() -> dict[str, tuple[int, int]]:
    """Every LoRA tensor of the tiny model (r=16 on all seven linears of each layer), full shape."""
    c = TINY_CONFIG
    H, I, hd = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = {"self_attn.q_proj": (H, q), "self_attn.k_proj": (H, kv), "self_attn.v_proj": (H, kv),
              "self_attn.o_proj": (q, H), "mlp.gate_proj": (H, I), "mlp.up_proj": (H, I), "mlp.down_proj": (I, H)}
    out = {}
    for layer in range(c["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            out[f"{key}.lora_A.weight"] = (16, fan_in)
            out[f"{key}.lora_B.weight"] = (fan_out, 16)
    return out


@dataclass
class Run:
    out: Path
    log: str

    @property
    def summary(self) -> dict:
        return json.loads((self.out / "summary.json").read_text())

    def rank_stats(self) -> list[dict]:
        files = sorted((self.out / "stats").glob("rank*.json"))
        return [json.loads(f.read_text()) for f in files]

    def train_losses(self) -> list[float]:
        history = json.loads((self.out / "history.json").read_text())
        return [e["loss"] for e in history if "loss" in e]


def _env(out: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTKIT / "instrument"), str(ROOT / "src"),
                                                    env.get("PYTHONPATH")) if p)
    env["MISTRAL_QLORA_DIST_STATS"] = str(out / "stats")
    env["DS_ACCELERATOR"] = "cpu"
    env.pop("LOCAL_RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    sets = {"data.train": data, "output_dir": out, "data.tokens_per_row": 256, "data.max_seq_len": 256,
            "train.max_steps": STEPS, "train.logging_steps": 1, "lora.dropout": 0, "eval.samples": 1,
            "eval.max_new_tokens": 4}
    args = ["train", str(ROOT / "configs" / "tiny.yaml")]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args + list(extra)


def _check(proc: subprocess.CompletedProcess, what: str) -> str:
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{log[-6000:]}"
    return log


def _run(cmd: list[str], out: Path, what: str) -> Run:
    proc = subprocess.run(cmd, env=_env(out), capture_output=True, text=True, timeout=600, cwd=out.parent)
    return Run(out, _check(proc, what))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("dist")
    data = root / "data.json"
    _write_dataset(data)
    return root, data


@pytest.fixture(scope="module")
def one_process(workdir) -> Run:
    """The reference: one process, 2 rows a step (one micro-batch of 2)."""
    root, data = workdir
    out = root / "one"
    return _run([sys.executable, "-m", "mistral_qlora", *_train_args(data, out, "--set", "train.micro_batch_size=2")],
                out, "one-process run")


@pytest.fixture(scope="module")
def runs(workdir):
    """Two-process runs, each started once and shared by the tests that read it."""
    root, data = workdir
    cache: dict[str, Run] = {}

    def get(strategy: str) -> Run:
        if strategy not in cache:
            out = root / strategy
            if strategy == "ddp":  # torchrun already in charge: `python -m mistral_qlora train` as-is, auto strategy
                cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                       "--master_port", str(free_port()), "-m", "mistral_qlora", *_train_args(data, out)]
            else:  # our launcher: accelerate launch with launch/<strategy>.yaml
                cmd = [sys.executable, "-m", "mistral_qlora",
                       *_train_args(data, out, "--set", f"train.strategy={strategy}", "--nproc", "2")]
            cache[strategy] = _run(cmd, out, f"2-process {strategy} run")
        return cache[strategy]

    return get


def _assert_trained_and_saved(run: Run, strategy: str) -> None:
    s = run.summary
    assert s["world_size"] == 2 and s["strategy"] == strategy and s["steps"] == STEPS
    assert f"train.strategy={strategy}" in run.log
    losses = run.train_losses()
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.5, losses
    assert s["final_eval_loss"] < s["initial_eval_loss"] - 0.5
    # complete: every LoRA tensor, full shape, nothing empty (the final adapter and the checkpoint's)
    assert check_adapter(run.out / "adapter", _expected_adapter()) == len(_expected_adapter())
    check_adapter(run.out / "checkpoints" / f"checkpoint-{STEPS}", _expected_adapter())
    for name in ("config.yaml", "samples.md", "loss.png"):
        assert (run.out / name).is_file()


def _assert_split_data(stats: list[dict]) -> None:
    assert [r["rank"] for r in stats] == [0, 1]
    assert {r["steps"] for r in stats} == {STEPS}  # every rank took the same number of steps
    rows0, rows1 = (set(r["rows_read"]) for r in stats)
    assert len(rows0) >= STEPS and len(rows1) >= STEPS
    assert not rows0 & rows1  # each rank read its own packed rows


def _assert_same_adapter(a: Run, b: Run, atol: float = 1e-4) -> None:
    ta, tb = adapter_tensors(a.out / "adapter"), adapter_tensors(b.out / "adapter")
    assert ta.keys() == tb.keys()
    worst = max((ta[k].float() - tb[k].float()).abs().max().item() for k in ta)
    moved = max(tb[k].float().abs().max().item() for k in tb if "lora_B" in k)
    assert moved > 10 * atol  # training moved lora_B away from its zero init ...
    assert worst < atol, f"adapters differ by {worst}"  # ... identically in both runs


def test_ddp_under_torchrun_trains_and_saves(runs):
    run = runs("ddp")
    _assert_trained_and_saved(run, "ddp")
    assert "auto: 2 processes without GPUs" in run.log  # auto, decided under the launcher
    stats = run.rank_stats()
    assert {r["engine"]["type"] for r in stats} == {"DistributedDataParallel"}
    _assert_split_data(stats)


def test_two_processes_end_where_one_process_does(runs, one_process):
    """Same global batch and data order: gradients averaged across ranks, data split between them."""
    assert one_process.summary["world_size"] == 1 and one_process.summary["strategy"] == "single"
    _assert_same_adapter(one_process, runs("ddp"))


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_deepspeed_trains_and_saves(runs, one_process, strategy):
    run = runs(strategy)
    _assert_trained_and_saved(run, strategy)
    stats = run.rank_stats()
    assert {r["engine"]["type"] for r in stats} == {"DeepSpeedEngine"}
    assert {r["engine"]["zero_stage"] for r in stats} == {int(strategy[-1])}
    assert {r["engine"]["dp_world_size"] for r in stats} == {2}
    _assert_split_data(stats)
    _assert_same_adapter(one_process, run)


def test_zero3_partitions_the_4bit_base(runs):
    stats = runs("zero3").rank_stats()
    base = [r["engine"]["partition"]["base"] for r in stats]
    total = base[0]["partitioned_numel"]
    assert total > 0 and base[1]["partitioned_numel"] == total
    for b in base:  # each rank holds about half (partitions are padded to equal sizes)
        assert 0.49 <= b["local_numel"] / total <= 0.52, b
        assert b["persistent_numel"] < 0.01 * total  # only norms stay whole (under 10 x hidden elements)
    assert sum(b["local_numel"] for b in base) >= total
    # loaded straight into partitions: the most a rank ever held whole was one block, not the model
    load = re.search(r"ZeRO-3: the base loaded block by block into partitions \((\d+) blocks\); the most this rank "
                     r"held whole at once: one block of ([\d,]+) of the base's ([\d,]+) elements", runs("zero3").log)
    blocks, largest, total = (int(g.replace(",", "")) for g in load.groups())
    assert blocks == TINY_CONFIG["num_hidden_layers"] + 3  # layers, embeddings, final norm, lm_head
    assert largest < 0.5 * total


def test_two_nodes_on_one_machine(workdir, one_process):
    """Two launch/train.sh invocations, node ranks 0 and 1, one main address: the multi-node path."""
    root, data = workdir
    out = root / "two_nodes"
    env = _env(out)
    env.update(NNODES="2", NPROC_PER_NODE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               MISTRAL_QLORA=f"{sys.executable} -m mistral_qlora")
    args = _train_args(data, out, "--set", "train.strategy=ddp")[1:]  # train.sh adds `train`
    procs = [subprocess.Popen([str(ROOT / "launch" / "train.sh"), *args], env={**env, "NODE_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root)
             for rank in (0, 1)]
    logs = []
    for rank, p in enumerate(procs):
        log, _ = p.communicate(timeout=600)
        assert p.returncode == 0, f"node {rank} failed:\n{log[-6000:]}"
        logs.append(log)
    assert all("multi_node.yaml" in log for log in logs)
    run = Run(out, logs[0])
    _assert_trained_and_saved(run, "ddp")
    stats = run.rank_stats()
    assert stats[0]["pid"] != stats[1]["pid"]
    _assert_split_data(stats)
    assert "done:" in logs[0] and "done:" not in logs[1]  # the summary is printed (and written) once
    _assert_same_adapter(one_process, run)
