"""The DeepSpeed and accelerate configs ship inside the package (mistral_qlora/resources); the
repository's top-level ds_configs/ and launch/ are the same files, for users to read and edit."""

from pathlib import Path

import pytest

from mistral_qlora import resources

from testkit import ROOT



@pytest.mark.parametrize("folder, pattern", [("ds_configs", "*.json"), ("launch", "*.yaml")])
def test_shipped_configs_are_the_repository_copies(folder, pattern):
    shipped = {p.name: p.read_bytes() for p in (resources.root() / folder).glob(pattern)}
    repository = {p.name: p.read_bytes() for p in (ROOT / folder).glob(pattern)}
    assert shipped and shipped.keys() == repository.keys()
    for name in shipped:
        assert shipped[name] == repository[name], f"{folder}/{name} differs from the package's copy"


def test_every_strategy_has_its_files(tmp_path, monkeypatch):
    for strategy in ("zero2", "zero3", "zero3_offload"):
        assert resources.ds_config_path(strategy).is_file()
    for strategy in ("single", "ddp", "zero2", "zero3", "zero3_offload"):
        assert resources.accelerate_config_path(strategy).is_file()
    assert resources.accelerate_config_path("zero3", nnodes=2).name == "multi_node.yaml"
    # the accelerate files name their DeepSpeed file relative to the root that holds both folders:
    # found in the current folder where it is there, else in the package
    monkeypatch.chdir(ROOT)
    assert resources.find_config_file("ds_configs/zero3.json") == Path("ds_configs/zero3.json")
    monkeypatch.chdir(tmp_path)
    assert resources.find_config_file("ds_configs/zero3.json") == resources.ds_config_path("zero3")
