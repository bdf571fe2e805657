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


# ---------------------------------------------------------------------------------------------
# Rules between keys: refused in load_config, before any data or model file is opened

# (the overrides that break the rule, what the one line says (naming the keys), overrides that keep it)
RULES = [
    (["data.tokens_per_row=256", "data.max_seq_len=512"],
     "data.tokens_per_row (256) must be >= data.max_seq_len (512)", ["data.packing=false"]),
    (["data.streaming=true", "data.packing=false", "data.eval_fraction=0", "train.max_steps=5"],
     "data.streaming packs rows as it reads; data.packing=false is not available", ["data.packing=true"]),
    (["data.streaming=true", "data.eval_fraction=0.1", "train.max_steps=5"],
     "data.streaming cannot hold out data.eval_fraction", ["data.eval_fraction=0"]),
    (["data.streaming=true", "data.eval_fraction=0"],
     "data.streaming needs train.max_steps", ["train.max_steps=5"]),
    (["train.strategy=zero3", "lora.dora=true"],
     "lora.dora cannot run with train.strategy=zero3", ["train.strategy=ddp"]),
    (["train.strategy=zero3_offload", "lora.modules_to_save=[lm_head]"],
     "lora.modules_to_save cannot run with train.strategy=zero3_offload", ["train.strategy=auto"]),
    (["quantization.compute=fp8", "train.strategy=zero3"],
     "quantization.compute=fp8 runs in the fused 4-bit LoRA layer only, and this run has train.strategy=zero3",
     ["train.strategy=auto"]),
    (["quantization.compute=fp8", "lora.fused=false"],
     "quantization.compute=fp8 runs in the fused 4-bit LoRA layer only, and this run has lora.fused=false",
     ["lora.fused=true"]),
    (["quantization.compute=fp8", "quantization.bits=16"],
     "quantization.compute=fp8 runs in the fused 4-bit LoRA layer only, and this run has quantization.bits=16",
     ["quantization.compute=bf16"]),
    (["quantization.compute=fp8", "lora.dora=true"],
     "quantization.compute=fp8 runs in the fused 4-bit LoRA layer only, and this run has lora.dora=true",
     ["lora.dora=false"]),
    (["quantization.compute=fp8", "model.dtype=float32"],
     "quantization.compute=fp8 runs with model.dtype bfloat16 only (got model.dtype=float32)",
     ["model.dtype=bfloat16"]),
    (["model.name_or_path=random:llama"],
     "model.name_or_path: the random architecture known here is 'random:mistral-7b'",
     ["model.name_or_path=random:mistral-7b"]),
]
RULE_IDS = [",".join(r[0]) for r in RULES]


@pytest.fixture
def no_data_step(monkeypatch):
    """The data step fails the test if reached: a rule must be refused before it."""
    import mistral_qlora.data
    import mistral_qlora.data.dataset
    import mistral_qlora.tools.prepare

    def reached(*args, **kwargs):
        pytest.fail("the data step was reached; the rule must be refused in load_config")

    for module in (mistral_qlora.data, mistral_qlora.data.dataset, mistral_qlora.tools.prepare):
        monkeypatch.setattr(module, "build_data", reached)


@pytest.mark.parametrize("broken, message, kept", RULES, ids=RULE_IDS)
def test_a_config_breaking_a_rule_between_keys_fails_in_load_config(tmp_path, no_data_step, broken, message, kept):
    missing = tmp_path / "no-such-data.jsonl"  # reaching the data step would say "data file not found"
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  train: {missing}\noutput_dir: {tmp_path / 'out'}\n")
    with pytest.raises(UserError) as info:
        load_config(config, broken)
    text = str(info.value)
    # a rule between keys is blamed on the file; a rule of one key on the --set that gave its value
    origin = f"{config}: " if len(broken) > 1 or "=random:" not in broken[0] else f"--set {broken[0]}: "
    assert text.startswith(origin) and message in text and "\n" not in text
    assert str(missing) not in text
    load_config(config, broken + kept)  # the same config with the rule kept loads


@pytest.mark.parametrize("broken, message, kept", RULES, ids=RULE_IDS)
def test_prepare_refuses_a_rule_between_keys_in_one_line_with_exit_2(tmp_path, capsys, no_data_step,
                                                                      broken, message, kept):
    from mistral_qlora.cli import main

    missing = tmp_path / "no-such-data.jsonl"
    args = ["prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={missing}",
            "--set", f"output_dir={tmp_path / 'out'}"]
    for item in broken:
        args += ["--set", item]
    with pytest.raises(SystemExit) as info:
        main(args)
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert info.value.code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("mistral-qlora: error: ") and message in lines[0]
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_rules_between_keys_are_listed_together():
    """A config that breaks several rules names all of them in its one line."""
    with pytest.raises(UserError) as info:
        load_config(None, ["data.streaming=true", "train.strategy=zero3", "lora.dora=true"])
    text = str(info.value)
    assert "data.streaming cannot hold out data.eval_fraction" in text
    assert "data.streaming needs train.max_steps" in text
    assert "lora.dora cannot run with train.strategy=zero3" in text
    assert "\n" not in text
