"""The launch glue without launching: strategies, the memory estimate behind `auto`, the accelerate
command line, the launch files, the per-node shell entry and the adapter check."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from mistral_qlora import resources
from mistral_qlora.errors import UserError
from mistral_qlora.relaunch import LaunchSpec, accelerate_command, launch_spec
from mistral_qlora.plan.strategy import launcher_deepspeed, strategy_of_ds_config
from mistral_qlora.runtime import launched_processes

from testkit import ROOT





# ---------------------------------------------------------------------------------------------
# Memory estimate and `auto`




def test_launcher_detection():
    assert launched_processes({}) is None
    assert launched_processes({"LOCAL_RANK": "1", "WORLD_SIZE": "4"}) == 4
    assert launcher_deepspeed({}) is None
    assert launcher_deepspeed({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}) == \
        ("zero3", None)


# ---------------------------------------------------------------------------------------------
# The launch files


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs(name):
    ds = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    assert ds["bf16"]["enabled"] == "auto"
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping"):
        assert ds[key] == "auto", key  # the run config is the one source
    assert "optimizer" not in ds and "scheduler" not in ds  # the Trainer's, from the run config
    assert strategy_of_ds_config(ds) == name
    if name.startswith("zero3"):
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.parametrize("name", ["single_gpu", "ddp", "zero2", "zero3", "zero3_offload", "multi_node"])
def test_accelerate_configs(name):
    conf = yaml.safe_load((ROOT / "launch" / f"{name}.yaml").read_text())
    assert conf["compute_environment"] == "LOCAL_MACHINE"
    if conf["distributed_type"] == "DEEPSPEED":
        ds = conf["deepspeed_config"]
        assert (ROOT / ds["deepspeed_config_file"]).is_file()
        assert ds["deepspeed_multinode_launcher"] == "standard"
        assert "mixed_precision" not in conf  # it comes from the DeepSpeed file ("auto")
    else:
        assert conf["mixed_precision"] == "no"  # the run config decides


def test_accelerate_command_one_node():
    spec = LaunchSpec(nproc=4, main_port=12345)
    cmd = accelerate_command(spec, "zero3", ["train", "c.yaml"], python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert cmd[cmd.index("--config_file") + 1] == str(resources.root() / "launch" / "zero3.yaml")
    assert cmd[cmd.index("--num_processes") + 1] == "4"
    assert cmd[cmd.index("--main_process_port") + 1] == "12345"
    assert cmd[cmd.index("--deepspeed_config_file") + 1] == str(resources.root() / "ds_configs" / "zero3.json")
    assert cmd[-4:] == ["-m", "mistral_qlora", "train", "c.yaml"]
    ddp = accelerate_command(LaunchSpec(nproc=2), "ddp", ["train", "c.yaml"])
    assert ddp[ddp.index("--config_file") + 1].endswith("launch/ddp.yaml")
    assert "--deepspeed_config_file" not in ddp
    assert int(ddp[ddp.index("--main_process_port") + 1]) > 0  # a free port


def test_accelerate_command_multi_node():
    spec = launch_spec(nproc=8, nnodes=4, node_rank=3, main_addr="10.0.0.1", env={})
    cmd = accelerate_command(spec, "zero3", ["train", "c.yaml"])
    flags = dict(zip(cmd[3:-4:2], cmd[4:-4:2]))
    assert flags["--config_file"].endswith("launch/multi_node.yaml")
    assert flags["--num_processes"] == "32" and flags["--num_machines"] == "4" and flags["--machine_rank"] == "3"
    assert flags["--main_process_ip"] == "10.0.0.1" and flags["--main_process_port"] == "29500"


def test_launch_spec_from_environment():
    env = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "7000", "NPROC_PER_NODE": "4"}
    assert launch_spec(env=env) == LaunchSpec(4, 2, 1, "node0", 7000)
    assert launch_spec(nproc=2, node_rank=0, env=env) == LaunchSpec(2, 2, 0, "node0", 7000)  # arguments win
    with pytest.raises(UserError, match="main node's address"):
        launch_spec(nproc=1, nnodes=2, env={})
    with pytest.raises(UserError, match="less than --nnodes"):
        launch_spec(nproc=1, nnodes=2, node_rank=2, main_addr="a", env={})
    with pytest.raises(UserError, match="--nproc"):
        launch_spec(nproc=0, env={})


def test_more_processes_than_gpus_are_refused_and_than_cpu_cores_warned(capsys):
    """tests/e2e/test_bad_input.py::test_more_processes_than_gpus covers the GPU refusal through the
    command line; without a GPU nothing was said when the processes outnumber the cores."""
    from mistral_qlora.relaunch import check_gpus

    with pytest.raises(UserError, match="--nproc 3 asks for 3 GPUs on this node but 2 are visible"):
        check_gpus(LaunchSpec(nproc=3), visible=2)
    check_gpus(LaunchSpec(nproc=2), visible=2, cores=1)  # one GPU each: the cores do not matter
    check_gpus(LaunchSpec(nproc=2), visible=0, cores=2)
    check_gpus(LaunchSpec(nproc=1), visible=0, cores=1)
    assert capsys.readouterr().err == ""
    check_gpus(LaunchSpec(nproc=3), visible=0, cores=2)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mistral-qlora: warning: no GPU: the 3 processes of --nproc 3 "
                                                    "share this machine's 2 CPU cores")


def test_train_sh_turns_environment_into_arguments(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                                                             "NPROC_PER_NODE", "SLURM_NNODES", "SLURM_NODEID")}
    env.update(MISTRAL_QLORA="echo mq", NNODES="2", SLURM_NODEID="1", MASTER_ADDR="h0", MASTER_PORT="7001",
               NPROC_PER_NODE="8")
    out = subprocess.run([str(ROOT / "launch" / "train.sh"), "c.yaml", "--set", "a=1"], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["mq", "train", "c.yaml", "--set", "a=1", "--nproc", "8", "--nnodes", "2", "--node-rank", "1",
                   "--main-addr", "h0", "--main-port", "7001"]


def test_cli_refuses_nproc_disagreeing_with_its_launcher(tmp_path, monkeypatch):
    from mistral_qlora.cli import main

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        main(["train", str(ROOT / "configs" / "tiny.yaml"), "--nproc", "4", "--set", f"output_dir={tmp_path}"])
    assert exc.value.code == 2


# ---------------------------------------------------------------------------------------------
# The adapter check


def test_check_adapter_refuses_empty_tensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from mistral_qlora.model.adapter import check_adapter

    good = {"m.q_proj.lora_A.weight": torch.ones(4, 8), "m.q_proj.lora_B.weight": torch.zeros(8, 4)}
    save_file(good, str(tmp_path / "adapter_model.safetensors"))
    assert check_adapter(tmp_path, {k: tuple(v.shape) for k, v in good.items()}) == 2
    with pytest.raises(RuntimeError, match="missing"):
        check_adapter(tmp_path, {"m.k_proj.lora_A.weight": (4, 8)})
    save_file({"m.q_proj.lora_A.weight": torch.ones(0)}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(RuntimeError, match="empty"):
        check_adapter(tmp_path)
    with pytest.raises(RuntimeError, match="not saved"):
        check_adapter(tmp_path / "nowhere")


def test_train_help_lists_process_flags():
    out = subprocess.run([sys.executable, "-m", "mistral_qlora", "train", "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, check=True).stdout
    for flag in ("--nproc", "--nnodes", "--node-rank", "--main-addr", "--main-port"):
        assert flag in out


def test_launcher_facts_are_read_from_the_current_environment(monkeypatch):
    """`datasets.map(num_proc=N)` rebinds os.environ to a copy: the launcher check must read the
    environment as it is now, not the object it was when the module loaded."""
    import copy
    import os

    from mistral_qlora.runtime import launched_processes

    monkeypatch.setattr(os, "environ", copy.deepcopy(os.environ))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_processes() == 2


def test_launched_processes_get_nccl_async_error_handling_unless_the_user_set_it():
    from mistral_qlora.relaunch import child_env

    assert child_env({"PATH": "/bin"})["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    assert child_env({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3"})["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"


def test_a_failed_launch_after_a_hang_recorded_in_output_dir_exits_with_the_hang_code(tmp_path):
    from mistral_qlora.errors import EXIT_HUNG
    from mistral_qlora.relaunch import run

    cmd = [sys.executable, "-c", f"import pathlib, sys; pathlib.Path({str(tmp_path / 'hang.json')!r}).write_text('{{}}'); "
           "sys.exit(1)"]
    assert run(cmd, dict(os.environ), str(tmp_path)) == EXIT_HUNG
    (tmp_path / "hang.json").unlink()
    assert run([sys.executable, "-c", "import sys; sys.exit(1)"], dict(os.environ), str(tmp_path)) == 1
