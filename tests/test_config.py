import pytest

from mistral_qlora.config import RunConfig, load_config, parse_override
from mistral_qlora.errors import UserError

from conftest import ROOT


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


def test_defaults_match_the_documented_keys():
    cfg = RunConfig()
    assert cfg.lora.r == 16 and cfg.lora.alpha == 32 and cfg.lora.target_modules == "all-linear"
    assert cfg.train.learning_rate == 2e-4 and cfg.train.lr_scheduler == "cosine"
    assert cfg.data.eval_fraction == 0.1 and cfg.data.train_on_prompt is False


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
