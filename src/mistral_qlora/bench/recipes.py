"""Recipe names and what each means.

- `padded+sdpa (tutorial)` (`tutorial`, or `seed`): the tutorial's recipe: padded batches, SDPA, and peft's
  `prepare_model_for_kbit_training` (every non-4-bit weight cast to float32, reentrant activation
  checkpointing on every layer).
- `packed+flex (plain)` (`plain`): plain transformers with packing: rows packed by best-fit
  decreasing, FlexAttention, the tutorial's preparation.
- `packed+BACKEND[+liger][+ckpt=all|none|auto|FRACTION][+lora=fused|peft][+rslora|+dora][+fp8]`:
  ours, as `train` runs it with model.attention=BACKEND, model.kernels=liger or none,
  train.gradient_checkpointing=true|false|auto|FRACTION (default all layers), lora.fused (default
  the fused layer), lora.rslora or lora.dora (default plain LoRA; DoRA runs on PEFT's layer),
  quantization.compute=fp8 (default bf16).
- `fast`, `fast-rslora`, `fast-dora`: the last (fastest) of the default recipes on this machine,
  with plain LoRA, rsLoRA or DoRA (`expand_recipes`).
"""

from __future__ import annotations

from dataclasses import dataclass

from mistral_qlora.config import RunConfig, validate_config
from mistral_qlora.errors import UserError
from mistral_qlora.model.base import load_base_model
from mistral_qlora.model.build import build_model
from mistral_qlora.model.lora import add_lora
from mistral_qlora.plan import Plan, make_plan
from mistral_qlora.plan.backends import fp8_problem, kernels_usable, usable_backends
from mistral_qlora.plan.layers import LayerPlan
from mistral_qlora.runtime import Runtime

TUTORIAL_RECIPE = "padded+sdpa (tutorial)"
PLAIN_RECIPE = "packed+flex (plain)"  # plain transformers: packing + FlexAttention, tutorial preparation
ALIASES = {"tutorial": TUTORIAL_RECIPE, "seed": TUTORIAL_RECIPE, "padded": TUTORIAL_RECIPE, "padded+sdpa": TUTORIAL_RECIPE, "plain": PLAIN_RECIPE}
PACKED_BACKENDS = ("sdpa", "flex", "varlen", "flash_attention_2")  # slowest to fastest
BACKENDS = PACKED_BACKENDS + ("eager",)
CKPT = {"all": True, "none": False, "auto": "auto"}
VARIANTS = ("rslora", "dora")
FAST = {"fast": "", "fast-rslora": "+rslora", "fast-dora": "+dora"}


@dataclass(frozen=True)
class Recipe:
    name: str
    batching: str  # padded | packed
    attention: str
    kbit_setup: str  # tutorial (peft's prepare_model_for_kbit_training) | ours
    kernels: str = "none"
    ckpt: str = "all"
    lora: str = "peft"  # peft (PEFT's LoRA layers) | fused (kernels/fused_lora.py)
    compute: str = "bf16"  # quantization.compute: bf16 | fp8
    variant: str = "lora"  # lora | rslora | dora (lora.rslora, lora.dora)

    @classmethod
    def parse(cls, name: str) -> "Recipe":
        name = ALIASES.get(name, name)
        if name == TUTORIAL_RECIPE:
            return cls(name, "padded", "sdpa", "tutorial")
        if name == PLAIN_RECIPE:
            return cls(name, "packed", "flex", "tutorial")
        parts = name.split("+")
        if parts[0] != "packed" or len(parts) < 2 or parts[1] not in BACKENDS:
            raise UserError(f"--recipes: unknown recipe {name!r} (tutorial, plain, or packed+BACKEND[+liger][+ckpt=X] "
                            f"with BACKEND one of {', '.join(BACKENDS)})")
        kernels, ckpt, lora, compute, variant = "none", "all", "fused", "bf16", "lora"
        for extra in parts[2:]:
            if extra in VARIANTS and variant == "lora":
                variant = extra
            elif extra == "liger":
                kernels = "liger"
            elif extra == "fp8":
                compute = "fp8"
            elif extra.startswith("ckpt=") and (extra[5:] in CKPT or _fraction(extra[5:])):
                ckpt = extra[5:]
            elif extra in ("lora=fused", "lora=peft"):
                lora = extra[5:]
            else:
                raise UserError(f"--recipes {name}: unknown part {extra!r} "
                                "(liger, ckpt=all|none|auto|FRACTION, lora=fused|peft, rslora or dora, fp8)")
        return cls(name, "packed", parts[1], "ours", kernels, ckpt, lora, compute=compute, variant=variant)

    def check_usable(self, dtype) -> None:
        """Refuse, before anything loads, a recipe this machine cannot run."""
        why = usable_backends(dtype)[self.attention]
        if why is not None:
            raise UserError(f"--recipes {self.name}: {why}")
        if self.kernels == "liger" and kernels_usable() is not None:
            raise UserError(f"--recipes {self.name}: Liger {kernels_usable()}")
        if self.compute == "fp8" and fp8_problem(dtype) is not None:
            raise UserError(f"--recipes {self.name}: fp8 {fp8_problem(dtype)}")


def _fraction(text: str) -> bool:
    try:
        return 0 < float(text) < 1
    except ValueError:
        return False


def default_recipes(dtype) -> list[str]:
    """The tutorial's recipe, plain transformers with packing + flex, packed with every usable
    backend, then the fastest backend with Liger's kernels: every layer recomputed (the
    low-memory setting) and as few as memory allows (ckpt=auto)."""
    usable = usable_backends(dtype)
    backends = [b for b in PACKED_BACKENDS if usable[b] is None]
    recipes = [TUTORIAL_RECIPE] + ([PLAIN_RECIPE] if usable["flex"] is None else []) + [f"packed+{b}" for b in backends]
    if kernels_usable() is None:
        best = backends[-1]
        recipes += [f"packed+{best}+liger", f"packed+{best}+liger+ckpt=auto"]
    return recipes


def expand_recipes(names: list[str] | None, dtype) -> list[str]:
    """--recipes with `fast[-rslora|-dora]` spelled out (None: the default recipes)."""
    if not names:
        return default_recipes(dtype)
    fastest = default_recipes(dtype)[-1]
    return [fastest + FAST[n] if n in FAST else n for n in names]


def recipe_config(recipe: Recipe, opts, model_path: str, method: str = "sft") -> RunConfig:
    """The run config of a `train` run of this recipe with the bench's shapes (one packed row a step)
    and `train.method`."""
    ckpt = CKPT[recipe.ckpt] if recipe.ckpt in CKPT else float(recipe.ckpt)
    return validate_config({
        "model": {"name_or_path": model_path, "sliding_window": opts.sliding_window, "attention": recipe.attention,
                  "dtype": opts.dtype, "kernels": recipe.kernels},
        "lora": {"r": opts.lora_r, "alpha": 2 * opts.lora_r, "fused": recipe.lora == "fused",
                 "rslora": recipe.variant == "rslora", "dora": recipe.variant == "dora"},
        "quantization": {"compute": recipe.compute},
        "data": {"tokens_per_row": opts.tokens_per_row, "max_seq_len": opts.max_len},
        "train": {"micro_batch_size": 1, "seed": opts.seed, "method": method,
                  "gradient_checkpointing": ckpt if opts.gradient_checkpointing else False},
    }, source="bench options")


def build_recipe_model(recipe: Recipe, opts, model_path: str, model_config, rt: Runtime, pad_token_id: int,
                       method: str = "sft"):
    """(model, plan or None): ours through `make_plan` and `build_model`, as `train` builds it for
    `train.method`; the tutorial's preparation by peft's `prepare_model_for_kbit_training` on the same
    4-bit base."""
    cfg = recipe_config(recipe, opts, model_path, method)
    if recipe.kbit_setup == "ours":
        plan = make_plan(cfg, model_config, rt)
        return build_model(cfg, plan, rt, model_path, model_config, pad_token_id)[0], plan
    from peft import prepare_model_for_kbit_training

    device_map = {"": rt.local_rank} if rt.device == "cuda" else None
    base = load_base_model(model_path, model_config, None, cfg.quantization, recipe.attention, rt.dtype,
                           device_map=device_map)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=opts.gradient_checkpointing)
    return add_lora(base, cfg.lora, LayerPlan(lora_layer="peft", recompute=0)), None


def plan_lines(recipe: Recipe, plan: Plan | None) -> list[str]:
    """What the plan decided for a recipe of ours, as the bench prints it."""
    if plan is None:
        return []
    lines = [f"lora: {plan.why['lora_layer']}",
             f"layers recomputing: {plan.layers.recompute} ({plan.why['recompute']})"]
    if plan.layers.fused:
        lines.append(f"dequantized weights kept for the run: {plan.why['kept_for_run']}")
        lines.append(f"base matmuls: {plan.why['compute']}")
    return [f"bench: {recipe.name}: {line}" for line in lines]
