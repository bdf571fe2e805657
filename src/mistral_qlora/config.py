"""The run config: one YAML file plus `--set a.b=value` overrides, validated into one `RunConfig`.

Every key is declared here, with its default and its allowed range. A value outside the range,
a wrong type or an unknown key is refused with a message naming the key; nothing is changed
silently.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mistral_qlora.errors import UserError

TINY_MODEL = "tiny-random-mistral"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    name_or_path: str = TINY_MODEL
    revision: str | None = None
    # "auto" keeps the checkpoint's own window; null removes it; an integer overrides it.
    sliding_window: Union[Literal["auto"], None, int] = "auto"
    attention: Literal["auto", "flash_attention_2", "varlen", "flex", "sdpa", "eager"] = "auto"
    # "auto": bfloat16 on a GPU that supports it, float32 elsewhere.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    # Fused Triton kernels (Liger: RoPE, RMSNorm, SwiGLU, linear+cross-entropy without logits).
    # "auto": liger on a CUDA GPU where liger-kernel is installed, none elsewhere.
    kernels: Literal["auto", "liger", "none"] = "auto"

    @field_validator("sliding_window")
    @classmethod
    def _window_positive(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("must be 'auto', null, or an integer >= 1")
        return v


class QuantizationSection(_Section):
    bits: Literal[4, 16] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


class LoraSection(_Section):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    fused: bool = True  # 4-bit base: the adapter folded into the base matmuls (modeling/fused_lora.py)


class DataSection(_Section):
    train: str = "dataset/story.json"
    eval: str | None = None
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    format: Literal["auto", "text", "prompt_response", "instruction", "messages"] = "auto"
    max_seq_len: int = Field(1024, ge=16, le=1_048_576)
    overlong: Literal["truncate", "drop"] = "truncate"
    train_on_prompt: bool = False
    packing: bool = True
    tokens_per_row: int = Field(4096, ge=16, le=1_048_576)


class TrainSection(_Section):
    epochs: float = Field(3, gt=0)
    max_steps: int = Field(-1, ge=-1)
    learning_rate: float = Field(2.0e-4, gt=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"] = "adamw_torch"
    micro_batch_size: int = Field(4, ge=1, le=4096)
    grad_accum: int = Field(1, ge=1, le=65536)
    # true: every decoder layer recomputes its activations in backward; false: none does; a fraction
    # in (0, 1): that share of the layers; auto: as few as the GPU's memory allows (train.memory).
    gradient_checkpointing: Union[bool, Literal["auto"], float] = True
    # auto: spend free GPU memory on skipping recompute; low: checkpoint every layer (about 10 GiB
    # for Mistral-7B at 8192-token rows).
    memory: Literal["auto", "low"] = "auto"
    # How the run is spread over processes (see mistral_qlora.distributed): auto picks single for one
    # process, ddp when the 4-bit model and activations fit one GPU, zero3 when they do not.
    strategy: Literal["auto", "single", "ddp", "zero2", "zero3", "zero3_offload"] = "auto"
    seed: int = Field(42, ge=0)
    eval_steps: int = Field(20, ge=1)
    save_steps: int = Field(50, ge=1)
    logging_steps: int = Field(5, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    # auto: continue from the newest complete checkpoint in output_dir; never; or a checkpoint folder.
    resume: str = "auto"
    # The GPU's dense bf16 peak for the MFU in the logs; null: looked up from the device name
    # (mistral_qlora.flops.PEAK_TFLOPS), no MFU where it is not known.
    peak_tflops: Union[float, None] = Field(None, gt=0)


    @field_validator("gradient_checkpointing")
    @classmethod
    def _fraction(cls, v):
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("must be true, false, auto, or a fraction of the layers between 0 and 1")
        return v


class EvalSection(_Section):
    # Held-out prompts answered before and after training, written to samples.md.
    samples: int = Field(3, ge=0, le=100)
    max_new_tokens: int = Field(48, ge=1, le=4096)


class RunConfig(_Section):
    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output_dir: str = "runs/tiny"

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value), the value read as YAML (so 3 is an int, null is None)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {item!r}: expected KEY=VALUE, for example --set train.epochs=1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for depth, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                dotted = ".".join(path[: depth + 1])
                raise UserError(f"--set {item}: '{dotted}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, dotted + "."))
    return keys


def _describe(err: dict, known: list[str]) -> str:
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("literal[", "int", "bool", "list")))
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "extra_forbidden":
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        if not hint:  # a misspelt key in the right section: compare the last part alone
            section, _, leaf = key.rpartition(".")
            peers = [k for k in known if k.rpartition(".")[0] == section]
            leaves = difflib.get_close_matches(leaf, [k.rpartition(".")[2] for k in peers], n=1, cutoff=0.5)
            hint = [f"{section}.{leaves[0]}" if section else leaves[0]] if leaves else []
        return f"unknown key '{key}'" + (f"; did you mean '{hint[0]}'?" if hint else "")
    def num(v):
        return format(v, "g") if isinstance(v, float) else v

    bounds = {
        "greater_than": f"must be > {num(ctx.get('gt'))}",
        "greater_than_equal": f"must be >= {num(ctx.get('ge'))}",
        "less_than": f"must be < {num(ctx.get('lt'))}",
        "less_than_equal": f"must be <= {num(ctx.get('le'))}",
    }
    if kind in bounds:
        return f"{key}: {bounds[kind]} (got {got!r})"
    if kind == "literal_error":
        return f"{key}: must be one of {ctx.get('expected')} (got {got!r})"
    if kind == "model_type" or kind == "dict_type":
        return f"{key}: must be a section (a mapping of keys), got {got!r}"
    msg = err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    return f"{key}: {msg} (got {got!r})"


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        known = _known_keys(RunConfig)
        errors = exc.errors()
        # Union types report one error per branch; keep the first per key so the line stays short.
        seen, parts = set(), []
        for err in errors:
            text = _describe(err, known)
            key = text.split(":")[0]
            if key not in seen:
                seen.add(key)
                parts.append(text)
        raise UserError(f"{source}: " + "; ".join(parts)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or start from the defaults when path is None), apply overrides, validate."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: config file not found (try configs/tiny.yaml)")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"{path}:{where}: not valid YAML: {problem}") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    raw = apply_overrides(raw, overrides or [])
    return validate_config(raw, source)
