"""The DeepSpeed and accelerate configs, shipped inside the package.

`mistral-qlora train --nproc N` launches with these files wherever the package is installed (a
wheel, a container, a source checkout). The repository's top-level `ds_configs/` and `launch/`
hold the same files, for users to read, copy and launch by hand
(`accelerate launch --config_file launch/zero3.yaml ...`); tests/test_resources.py proves the two
copies are identical. Inside the package the folders keep the repository's layout, so the
accelerate files' relative `deepspeed_config_file: ds_configs/...` resolves against either root.

DeepSpeed files leave batch sizes, accumulation, clipping and bf16 "auto": the run config is the
one source, and the Trainer fills them in.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

# train.strategy -> DeepSpeed config
DEEPSPEED_FILES = {"zero2": "zero2.json", "zero3": "zero3.json", "zero3_offload": "zero3_offload.json"}
# train.strategy -> accelerate config for the processes of one node
NODE_CONFIGS = {
    "single": "single_gpu.yaml",
    "ddp": "ddp.yaml",
    "zero2": "zero2.yaml",
    "zero3": "zero3.yaml",
    "zero3_offload": "zero3_offload.yaml",
}
# several nodes, any strategy: the DeepSpeed config then comes from train.strategy
MULTI_NODE_CONFIG = "multi_node.yaml"


def root() -> Path:
    """The folder that holds `ds_configs/` and `launch/`."""
    return Path(str(files(__name__)))


def ds_config_path(strategy: str) -> Path:
    return root() / "ds_configs" / DEEPSPEED_FILES[strategy]


def accelerate_config_path(strategy: str, nnodes: int = 1) -> Path:
    """The accelerate config for this strategy; one process still launches through DDP's file."""
    if nnodes > 1:
        return root() / "launch" / MULTI_NODE_CONFIG
    return root() / "launch" / NODE_CONFIGS["ddp" if strategy == "single" else strategy]


def find_config_file(name: str) -> Path:
    """A config file named in an accelerate config or by a user: as given (absolute, or relative
    to the current folder), else relative to the shipped root, where `ds_configs/zero3.json`
    (the accelerate files' own way of naming it) is found."""
    path = Path(name)
    if path.is_absolute() or path.is_file():
        return path
    return root() / name
