"""One training run: config -> data -> model -> transformers.Trainer -> artifacts in output_dir.

Read top to bottom, this is the whole recipe. Everything that can fail because of the user's
input (config, data, paths) is checked before the first byte is written to output_dir.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mistral_qlora.artifacts import SUMMARY, perplexity, plot_loss, samples_markdown, atomic_write_text, write_json
from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError

# What a run owns in output_dir (removed by --overwrite; nothing else is touched).
RUN_FILES = ("adapter", "checkpoints", "tensorboard", SUMMARY, "config.yaml", "loss.png", "samples.md")


@dataclass
class Runtime:
    """Where this process runs: device, dtype and its place among the ranks."""

    device: str
    dtype: torch.dtype
    world_size: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def detect(cls, dtype_name: str) -> "Runtime":
        from mistral_qlora.modeling.model import resolve_dtype

        return cls(
            device="cuda" if torch.cuda.is_available() else "cpu",
            dtype=resolve_dtype(dtype_name),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            rank=int(os.environ.get("RANK", "0")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir={str(out)!r} is a file, not a folder")
    if (out / SUMMARY).is_file() and not overwrite:
        raise UserError(
            f"output_dir={str(out)!r} holds a finished run; pass --overwrite to replace it "
            "or set output_dir to a new folder"
        )
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe, os.W_OK):
        raise UserError(f"output_dir={str(out)!r} is not writable ({probe} refuses writes)")


def clear_previous_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def training_arguments(cfg: RunConfig, rt: Runtime, has_eval: bool, deepspeed: str | None = None):
    """Created before the model is loaded: with a DeepSpeed config this is what tells transformers
    (is_deepspeed_zero3_enabled) and starts the process group the ZeRO-3 loader partitions over."""
    from transformers import TrainingArguments

    t = cfg.train
    out = Path(cfg.output_dir)
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        optim=t.optimizer,
        seed=t.seed,
        data_seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        eval_on_start=has_eval,
        save_strategy="steps",
        save_steps=t.save_steps,
        bf16=rt.dtype == torch.bfloat16,
        fp16=rt.dtype == torch.float16,
        use_cpu=rt.device == "cpu",
        report_to="none",  # TensorBoard is added explicitly, after the throughput callback
        disable_tqdm=not rt.is_main,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_pin_memory=rt.device == "cuda",
        deepspeed=deepspeed,
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every step
        log_on_each_node=False,  # one log, from global rank 0
    )


def run_training(cfg: RunConfig, overwrite: bool = False) -> dict:
    from transformers import PrinterCallback, Trainer, set_seed
    from transformers.integrations import TensorBoardCallback

    from mistral_qlora.callbacks import (STATS_ENV, AdapterCheckCallback, DistStatsCallback, RecordingDataset,
                                         SamplesCallback, ThroughputCallback)
    from mistral_qlora.data import prepare_data
    from mistral_qlora.distributed import barrier, is_zero3, launched_processes, plan_strategy, single_process_env
    from mistral_qlora.generate import generate_answers
    from mistral_qlora.modeling.adapter import save_adapter
    from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS, select_attention
    from mistral_qlora.modeling.model import (add_lora, keep_4bit_layout, load_base_model, load_model_config,
                                              resolve_model_path)
    from mistral_qlora.modeling.tokenizer import load_tokenizer

    started = time.time()
    out = Path(cfg.output_dir)
    check_output_dir(out, overwrite)
    rt = Runtime.detect(cfg.model.dtype)

    # 1. Data: everything validated and tokenized before anything is written.
    model_path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.model.revision)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, cfg.eval.samples)
    attention = select_attention(cfg.model.attention)

    # 2. Strategy, then the Trainer's arguments: both before the model, which ZeRO-3 loads
    #    straight into partitions over the process group the arguments start.
    strategy, why, ds_config = plan_strategy(cfg, rt.world_size)
    if rt.is_main:
        print(f"mistral-qlora: train.strategy={strategy} ({why})", file=sys.stderr, flush=True)
    if ds_config is not None and launched_processes() is None:
        single_process_env()
    args = training_arguments(cfg, rt, has_eval=bool(data.eval),
                              deepspeed=str(ds_config) if ds_config is not None else None)
    rt.world_size = args.world_size
    zero3 = is_zero3(strategy)

    # 3. Model: 4-bit base + LoRA.
    load_stats = None
    if zero3:
        from mistral_qlora.modeling.zero3 import load_base_model_zero3

        hf_ds = args.hf_deepspeed_config
        hidden = load_model_config(model_path, cfg.model).hidden_size
        # the hidden-size "auto" values the Trainer would fill later, needed now by zero.Init
        hf_ds.fill_only("zero_optimization.reduce_bucket_size", hidden * hidden)
        hf_ds.fill_only("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden * hidden))
        hf_ds.fill_only("zero_optimization.stage3_param_persistence_threshold", 10 * hidden)
        device = torch.device("cuda", rt.local_rank) if rt.device == "cuda" else torch.device("cpu")
        model, load_stats = load_base_model_zero3(model_path, cfg.model, cfg.quantization, attention, rt.dtype,
                                                  device, hf_ds.config)
    else:
        device_map = {"": rt.local_rank} if rt.device == "cuda" else None
        model = load_base_model(model_path, cfg.model, cfg.quantization, attention, rt.dtype, device_map=device_map)
    if rt.device == "cpu" and cfg.quantization.bits == 4:
        keep_4bit_layout(model)
    # Under ZeRO-3 + PEFT only reentrant checkpointing works (non-reentrant raises CheckpointError).
    # Seeded here: every rank, strategy and rerun starts from the same adapter.
    set_seed(cfg.train.seed)
    model = add_lora(model, cfg.lora, cfg.train.gradient_checkpointing, reentrant=zero3)
    if zero3 and rt.dtype != torch.float32:
        # DeepSpeed keeps fp32 master weights and casts the module to bf16 itself, except for a model
        # ZeRO-3 built (ours): do it for the adapter, which PEFT created in fp32.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(rt.dtype)
    # Record the name the user gave (tiny-random-mistral, a hub id), not a cache path.
    model.peft_config["default"].base_model_name_or_path = cfg.model.name_or_path

    # 4. Output folder: only now is anything written, by rank 0 while the others wait.
    if rt.is_main:
        if overwrite:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
    barrier()

    # 5. Train. Samples are generated by every rank in lockstep (ZeRO-3 gathers each layer
    #    collectively) once the engine is up, and written by rank 0 alone.
    cu = attention in TAKES_CU_SEQLENS
    throughput = ThroughputCallback()
    samples = SamplesCallback(model, tokenizer, data.sample_prompts, cfg.eval.max_new_tokens)
    callbacks = [samples, throughput, AdapterCheckCallback()]
    train_dataset = data.train_dataset()
    stats = None
    if os.environ.get(STATS_ENV):  # per-rank facts for the multi-process tests
        train_dataset = RecordingDataset(train_dataset)
        stats = DistStatsCallback(os.environ[STATS_ENV], strategy, load_stats, train_dataset)
        callbacks.append(stats)
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=data.eval or None,
        data_collator=data.collator(tokenizer.pad_token_id, with_cu_seqlens=cu),
        processing_class=tokenizer,
        callbacks=[*callbacks, TensorBoardCallback()],
    )
    if stats is not None:
        stats.trainer = trainer
    if not rt.is_main:  # the local rank 0 of every other node would print the logs again
        trainer.remove_callback(PrinterCallback)
    if rt.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()

    # 6. Final evaluation, adapter, artifacts.
    history = trainer.state.log_history
    evals = [e for e in history if "eval_loss" in e]
    final_eval_loss = None
    if data.eval:
        if not evals or evals[-1]["step"] != trainer.state.global_step:
            trainer.evaluate()
            evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        final_eval_loss = evals[-1]["eval_loss"]
    initial_eval_loss = evals[0]["eval_loss"] if evals else None

    samples_before = samples.before
    samples_after = generate_answers(model, tokenizer, data.sample_prompts, cfg.eval.max_new_tokens)
    save_adapter(model, tokenizer, out / "adapter", zero3=zero3, is_main=rt.is_main)
    summary = {
        "initial_eval_loss": initial_eval_loss,
        "final_eval_loss": final_eval_loss,
        "initial_eval_perplexity": perplexity(initial_eval_loss),
        "final_eval_perplexity": perplexity(final_eval_loss),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_second": throughput.tokens_per_second,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if rt.device == "cuda" else None,
        "world_size": rt.world_size,
        "strategy": strategy,
        "attention_backend": attention,
        "runtime_seconds": round(time.time() - started, 2),
        "model": cfg.model.name_or_path,
        "sliding_window": model.config.sliding_window,
        "dtype": str(rt.dtype).removeprefix("torch."),
        "records": {
            "train": data.train_stats.records,
            "eval": data.eval_stats.records,
            "truncated": data.train_stats.truncated + data.eval_stats.truncated,
            "dropped": data.train_stats.dropped + data.eval_stats.dropped,
        },
        "packing": None if data.packed_rows is None else {
            "tokens_per_row": data.tokens_per_row,
            "rows": len(data.packed_rows),
            "efficiency": data.packing_efficiency,
        },
    }
    if rt.is_main:
        plot_loss(out / "loss.png", history, f"{cfg.model.name_or_path}: QLoRA r={cfg.lora.r}")
        atomic_write_text(out / "samples.md", samples_markdown(data.sample_prompts, samples_before, samples_after))
        write_json(out / SUMMARY, summary)  # written last: its presence marks a finished run
    barrier()  # the others wait for rank 0's files, so the run ends when they exist
    return summary
