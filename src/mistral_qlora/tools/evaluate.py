"""`mistral-qlora evaluate`: lm-evaluation-harness scores of a run's model, before and after its adapter.

The model loads as the run trained it: the run's config.yaml (beside `adapter/`) gives the
quantization, attention backend, dtype, sliding window and kernels; the base through
model/base.py, then the adapter. Both columns come from that one load (run/task_eval.py switches
the adapter off for `before`). Everything the user can get wrong (the flags, lm-eval missing, the
tasks, the base) is refused before the base loads. The table goes to RUN/eval/results.{json,md}
(or `--output`) and is returned for printing.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mistral_qlora.config import RunConfig, load_config
from mistral_qlora.errors import UserError
from mistral_qlora.model.adapter import attach_adapter
from mistral_qlora.model.base import keep_4bit_layout, load_base_model, load_model_config, resolve_model_path
from mistral_qlora.model.liger import apply_kernels
from mistral_qlora.model.tokenizer import load_tokenizer
from mistral_qlora.plan.backends import select_attention, select_kernels
from mistral_qlora.run.task_eval import TaskSpec, before_after, prepare_tasks, table_markdown, write_table
from mistral_qlora.runtime import resolve_dtype
from mistral_qlora.tools.generate import run_template
from mistral_qlora.tools.merge import resolve_base


def run_config(adapter: str | None) -> RunConfig:
    """The config of the run an adapter came from (its run folder's config.yaml), else the defaults."""
    config = Path(adapter).parent / "config.yaml" if adapter else None
    return load_config(config if config is not None and config.is_file() else None)


def load_as_trained(cfg: RunConfig, base_name: str, path: str, adapter: str | None, bits: int | None = None):
    """(model, tokenizer): the base as `cfg` loads it for training (bits: override the run's), the
    adapter attached if given, in eval mode."""
    quant = cfg.quantization.model_copy(update={"bits": bits}) if bits is not None else cfg.quantization
    model_cfg = cfg.model.model_copy(update={"name_or_path": base_name})
    dtype = resolve_dtype(model_cfg.dtype)
    has_tokenizer = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(adapter if has_tokenizer else path)
    device_map = {"": 0} if torch.cuda.is_available() else None
    try:
        net = load_base_model(path, load_model_config(path, model_cfg), model_cfg.revision, quant,
                              select_attention(model_cfg.attention, dtype), dtype, device_map=device_map)
    except OSError as exc:
        raise UserError(f"cannot load the base model {base_name!r}: {str(exc).splitlines()[0]}; "
                        "pass --model with the base it was trained on") from None
    if not torch.cuda.is_available() and quant.bits == 4:
        keep_4bit_layout(net)  # the training path's CPU 4-bit numerics
    apply_kernels(net, select_kernels(model_cfg.kernels))
    if adapter is not None:
        net = attach_adapter(net, adapter, base_name)
    net.config.pad_token_id = tokenizer.pad_token_id
    net.eval()
    return net, tokenizer


def evaluate(adapter: str | None, model: str | None, spec: TaskSpec, output: str | None = None,
             bits: int | None = None) -> tuple[dict, str, Path]:
    """(table, its Markdown, the folder written). With an adapter: before/after columns into
    RUN/eval (or `output`); a model alone: one column into `output`."""
    if adapter is None and model is None:
        raise UserError("evaluate: give --adapter RUN/adapter (before and after) or --model NAME_OR_PATH")
    if adapter is None and output is None:
        raise UserError("evaluate --model without --adapter: give --output DIR for the table")
    if spec.limit is not None and spec.limit < 1:
        raise UserError(f"--limit {spec.limit}: must be at least 1 (leave it out for every example)")
    if adapter is not None:
        base_name, path = resolve_base(adapter, model)
    else:
        base_name, path = model, resolve_model_path(model)
    cfg = run_config(adapter)
    manager = prepare_tasks(spec)  # before the model loads: unknown tasks, missing data
    out = Path(output) if output else Path(adapter).parent / "eval"
    started = time.perf_counter()
    net, tokenizer = load_as_trained(cfg, base_name, path, adapter, bits)
    loaded = time.perf_counter() - started
    template = None
    if spec.chat_template:
        from mistral_qlora.data.templates import resolve_template

        template = resolve_template(run_template(adapter) if adapter else "auto", tokenizer)
    table = before_after(net, tokenizer, spec, manager, template, adapter=adapter is not None)
    table["model"] = base_name
    table["adapter"] = adapter
    table["bits"] = bits if bits is not None else cfg.quantization.bits
    table["load_seconds"] = round(loaded, 2)
    table["elapsed_seconds"] = round(time.perf_counter() - started, 2)
    write_table(table, out)
    return table, table_markdown(table), out
