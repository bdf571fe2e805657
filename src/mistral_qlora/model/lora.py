"""LoRA on the base, as the plan's `LayerPlan` says (plan/layers.py).

`add_lora` freezes the base, turns recompute on for the first k decoder layers, wraps the target
linears with PEFT's LoRA layers or, on a 4-bit base, with the fused layer (kernels/fused_lora.py,
registered through PEFT's custom-module extension point), configures the fused layers and, where
the plan says, computes the recomputing layers' MLPs over sequence tiles (model/tiling.py).
`configure_fused_layers` is the one place their run-time options are set: how long each keeps its
dequantized weight, whether the adapter's product is written first, and which linears share an
input-gradient buffer. With `lora.init_from` the adapters start from a saved adapter's weights
(`check_init_adapter` before the model loads, `load_init_adapter` once the adapters exist).
"""

from __future__ import annotations

import json
from pathlib import Path

from mistral_qlora.config import LoraSection
from mistral_qlora.errors import UserError
from mistral_qlora.kernels.fused_lora import (KEEP_FOR_BACKWARD, KEEP_FOR_RUN, KEEP_NONE, SHARED_INPUT_LINEARS,
                                              FusedLoraLinear4bit, InputGroup, register_fused_lora)
from mistral_qlora.model.offload import BoundaryOffload, install
from mistral_qlora.model.tiling import tile_mlps
from mistral_qlora.plan.layers import LayerPlan


def decoder_layers(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder().layers if hasattr(base, "get_decoder") else base.model.layers


def set_recompute_layers(model, k: int, reentrant: bool = False, offload: bool = False) -> None:
    """Recompute the first k decoder layers in backward, keep the others' activations, through
    each decoder layer's own switch (transformers' GradientCheckpointingLayer); with `offload`
    their inputs wait for backward in host memory (model/offload.py), through the checkpoint
    function each such layer calls."""
    if k <= 0:
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    for i, layer in enumerate(decoder_layers(model)):
        layer.gradient_checkpointing = i < k
    if offload:
        install(decoder_layers(model), BoundaryOffload(), reentrant)
    # Reentrant checkpointing only back-propagates into a block whose input requires grad.
    model.enable_input_require_grads()


def check_module_names(model, lora_cfg: LoraSection) -> None:
    """Every name in `lora.target_modules` and `lora.modules_to_save` matches a module of the base
    (as PEFT matches them: the full dotted name or its last parts), else one line naming it."""
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rpartition(".")[2] for n in names})

    def matches(key: str) -> bool:
        return any(n == key or n.endswith("." + key) for n in names)

    for key, wanted in (("lora.target_modules", lora_cfg.target_modules), ("lora.modules_to_save",
                                                                            lora_cfg.modules_to_save)):
        if wanted == "all-linear":
            continue
        missing = [m for m in wanted if not matches(m)]
        if missing:
            raise UserError(f"{key}: {', '.join(missing)} is not a module of the base model; its modules are "
                            f"named {', '.join(leaves)}")


def lora_config(lora_cfg: LoraSection):
    """PEFT's LoraConfig for `lora`: rank, alpha (alpha / sqrt(r) with rslora), DoRA, the modules
    trained in full (`modules_to_save`), saved with the adapter."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        use_rslora=lora_cfg.rslora,
        use_dora=lora_cfg.dora,
        modules_to_save=list(lora_cfg.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model, lora_cfg: LoraSection, layers: LayerPlan):
    """The base frozen, recompute set, LoRA adapters added: a PeftModel."""
    from peft import get_peft_model

    check_module_names(model, lora_cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    set_recompute_layers(model, layers.recompute, layers.reentrant, layers.offload)
    peft_config = lora_config(lora_cfg)
    if layers.fused:
        register_fused_lora(peft_config)
    model = get_peft_model(model, peft_config)
    if lora_cfg.init_from:
        load_init_adapter(model, lora_cfg.init_from)
    if layers.fused:
        configure_fused_layers(model, layers)
    if layers.mlp_tile:  # after PEFT has put its layers inside the MLPs the tiles call
        tile_mlps(decoder_layers(model), layers.mlp_tile)
    return model


def _saved_lora_config(folder: str) -> dict:
    path = Path(folder) / "adapter_config.json"
    if not (Path(folder) / "adapter_model.safetensors").is_file() or not path.is_file():
        raise UserError(f"lora.init_from: {folder} is not an adapter folder (no adapter_config.json and "
                        "adapter_model.safetensors); point it at a run's adapter/ folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"lora.init_from: {path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None


def check_init_adapter(lora_cfg: LoraSection) -> None:
    """The adapter of `lora.init_from` has this config's shape (rank, alpha, rsLoRA, DoRA), else one
    line naming the first mismatch; its target modules are compared once the model resolved ours."""
    saved = _saved_lora_config(lora_cfg.init_from)
    for key, ours, theirs in (("r", lora_cfg.r, saved.get("r")), ("alpha", lora_cfg.alpha, saved.get("lora_alpha")),
                              ("rslora", lora_cfg.rslora, bool(saved.get("use_rslora"))),
                              ("dora", lora_cfg.dora, bool(saved.get("use_dora")))):
        if theirs is None or float(ours) != float(theirs):
            raise UserError(f"lora.init_from: {lora_cfg.init_from} has lora {key}={theirs} and this run lora.{key}="
                            f"{ours}; set lora.{key}={theirs} (the adapter's weights only fit its own shape)")


def load_init_adapter(model, folder: str) -> None:
    """Copy a saved adapter's tensors into the PeftModel's freshly made adapters (PEFT's
    `set_peft_model_state_dict`): the same target modules, every tensor found and of its shape."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_init_adapter_targets(model, folder)
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    try:
        result = set_peft_model_state_dict(model, tensors)
    except RuntimeError as exc:
        line = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise UserError(f"lora.init_from: {folder} does not fit this model: {line}") from None
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        names = (missing or unexpected)[:2]
        raise UserError(f"lora.init_from: {folder} does not fit this model ({len(missing)} adapter tensors missing, "
                        f"{len(unexpected)} unexpected, e.g. {', '.join(names)}); train it with the same base and "
                        "lora settings")


def check_init_adapter_targets(model, folder: str) -> None:
    saved = _saved_lora_config(folder).get("target_modules") or []
    ours = model.peft_config["default"].target_modules
    saved, ours = ({saved} if isinstance(saved, str) else set(saved)), ({ours} if isinstance(ours, str) else set(ours))
    if saved != ours:
        raise UserError(f"lora.init_from: {folder} adapts {', '.join(sorted(saved))} and this run adapts "
                        f"{', '.join(sorted(ours))}; set lora.target_modules to [{', '.join(sorted(saved))}]")


def configure_fused_layers(model, layers: LayerPlan) -> None:
    """Set every fused LoRA linear's options from the plan: the recomputing layers (the first
    `layers.recompute`) keep their dequantized weight from recompute to backward, the last
    `layers.kept_for_run` of the others keep it for the whole run; the linears of each attention
    (q/k/v) and MLP (gate/up) share one input-gradient buffer and, under FP8, one quantized input;
    every fused linear runs the base's matmuls in `layers.compute`."""
    blocks = decoder_layers(model)
    for i, block in enumerate(blocks):
        recomputes = i < layers.recompute
        for_run = not recomputes and i >= len(blocks) - layers.kept_for_run
        if not layers.keep_weights or not (recomputes or for_run):
            keep = KEEP_NONE
        elif for_run and layers.keep_across_steps:
            keep = KEEP_FOR_RUN
        else:
            keep = KEEP_FOR_BACKWARD
        groups = {}
        if layers.shared_input_grad or layers.compute == "fp8":
            for module in block.modules():
                for names in SHARED_INPUT_LINEARS:
                    members = [getattr(module, n, None) for n in names]
                    if all(isinstance(m, FusedLoraLinear4bit) for m in members):
                        group = InputGroup(len(members), share_grad=layers.shared_input_grad)
                        groups.update({id(m): group for m in members})
        for module in block.modules():
            if isinstance(module, FusedLoraLinear4bit):
                module.configure(keep, layers.product_first, groups.get(id(module)), layers.compute)
