import pytest

from mistral_qlora.config import RunConfig, load_config, parse_override
from mistral_qlora.errors import UserError

from testkit import ROOT


def test_tiny_and_7b_configs_validate():
    tiny = load_config(ROOT / "configs/tiny.yaml")
    assert tiny.model.name_or_path == "tiny-random-mistral"
    assert tiny.quantization.bits == 4 and tiny.quantization.quant_type == "nf4"
    big = load_config(ROOT / "configs/mistral-7b-instruct-v0.2.yaml")
    assert big.model.name_or_path == "mistralai/Mistral-7B-Instruct-v0.2"


def test_overrides_are_typed_yaml():
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.epochs=1", "model.sliding_window=null",
                                                   "lora.target_modules=[q_proj, v_proj]", "data.packing=false"])
    assert cfg.train.epochs == 1
    assert cfg.model.sliding_window is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is False
    assert parse_override("a.b=3") == (["a", "b"], 3)


def test_defaults_are_the_embedded_default_run():
    """The schema's defaults are what configs/tiny.yaml spells out, key for key."""
    cfg = RunConfig()
    assert load_config(ROOT / "configs/tiny.yaml") == cfg
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.target_modules == "all-linear"
    assert cfg.train.learning_rate == 2e-3 and cfg.train.lr_scheduler == "cosine"
    assert cfg.data.eval_fraction == 0.1 and cfg.data.train_on_prompt is False
    assert cfg.data.tokens_per_row == cfg.data.max_seq_len == 512 and cfg.train.micro_batch_size == 1


def test_every_key_is_described_and_docs_config_md_is_current():
    """docs/config.md is generated from the schema's descriptions; regenerate it with
    `python -m mistral_qlora.tools.config_reference > docs/config.md`."""
    from pydantic import BaseModel

    from mistral_qlora.tools.config_reference import reference_markdown

    for name, field in RunConfig.model_fields.items():
        section = field.annotation
        keys = section.model_fields.items() if isinstance(section, type) and issubclass(section, BaseModel) else []
        for key, sub in keys:
            assert sub.description and len(sub.description) > 10, f"{name}.{key} has no description"
    text = reference_markdown()
    assert (ROOT / "docs/config.md").read_text() == text, "docs/config.md is stale: regenerate it"
    for key in ("model.name_or_path", "train.gradient_checkpointing", "train.memory", "data.tokens_per_row",
                "lora.fused", "output_dir"):
        assert f"| `{key}` |" in text
    assert "| `train.learning_rate` | number (> 0, <= 1) | `0.002` |" in text


@pytest.mark.parametrize("override, expected", [
    ("train.learnig_rate=0.1", "unknown key 'train.learnig_rate'; did you mean 'train.learning_rate'?"),
    ("lora.rank=8", "unknown key 'lora.rank'; did you mean 'lora.r'?"),
    ("trian.epochs=1", "unknown key 'trian'; did you mean 'train'?"),
    ("train.learning_rate=-1", "train.learning_rate: must be > 0 (got -1)"),
    ("data.eval_fraction=1.5", "data.eval_fraction: must be < 1 (got 1.5)"),
    ("lora.r=0", "lora.r: must be >= 1 (got 0)"),
    ("train.epochs=many", "train.epochs: "),
    ("model.attention=fast", "model.attention: must be one of"),
    ("quantization.bits=3", "quantization.bits: must be one of"),
])
def test_bad_values_name_the_key(override, expected):
    with pytest.raises(UserError) as info:
        load_config(ROOT / "configs/tiny.yaml", [override])
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_errors_name_the_set_item_or_the_file_their_value_came_from(tmp_path):
    """test_bad_values_name_the_key checks the key's text only: a --set typo used to be blamed on the file."""
    with pytest.raises(UserError) as info:
        load_config(ROOT / "configs/tiny.yaml", ["train.lerning_rate=1e-4"])
    assert str(info.value) == ("--set train.lerning_rate=1e-4: unknown key 'train.lerning_rate'; "
                               "did you mean 'train.learning_rate'?")
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  epochs: 0\n")
    with pytest.raises(UserError) as info:
        load_config(config, ["lora.r=0", "train.seed=1"])
    assert str(info.value) == f"--set lora.r=0: lora.r: must be >= 1 (got 0); {config}: train.epochs: must be > 0 (got 0)"
    # a --set that replaces the file's value takes the blame for it
    with pytest.raises(UserError, match=r"^--set train=\{epochs: -1\}: train.epochs: must be > 0"):
        load_config(config, ["train={epochs: -1}"])


def test_unknown_key_of_a_data_source_suggests_a_key_of_a_source(tmp_path):
    """The suggestion looks among the keys valid where the typo is: `weight` of a source, not `data.train`."""
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  train: [{path: a.json, wieght: 2}]\n  eval: [{path: b.json, splt: test}]\n")
    with pytest.raises(UserError) as info:
        load_config(config)
    assert str(info.value) == (f"{config}: unknown key 'data.train.0.wieght'; did you mean 'data.train.0.weight'?; "
                               "unknown key 'data.eval.0.splt'; did you mean 'data.eval.0.split'?")


def test_a_folder_given_as_the_config_is_named_a_folder(tmp_path):
    with pytest.raises(UserError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory; give a config YAML file (for example configs/tiny.yaml)"


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: [unclosed\n")
    with pytest.raises(UserError, match=r"bad.yaml: line \d+, column \d+: not valid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        load_config(None, ["novalue"])


def test_resolved_config_roundtrips(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["train.seed=7"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
