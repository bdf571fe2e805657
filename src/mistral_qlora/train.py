"""One training run: config -> data -> model -> transformers.Trainer -> artifacts in output_dir.

Read top to bottom, this is the whole recipe. Everything that can fail because of the user's
input (config, data, paths, an incompatible checkpoint) is checked before the first byte is
written to output_dir. Checkpoints are staged and committed atomically (checkpoints.py), so a
kill at any moment loses at most the steps since the last save.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mistral_qlora import checkpoints
from mistral_qlora.artifacts import SUMMARY, atomic_write_text, perplexity, plot_loss, samples_markdown, write_json
from mistral_qlora.config import RunConfig
from mistral_qlora.errors import Preempted, UserError

# What a run owns in output_dir (removed by --overwrite; nothing else is touched).
RUN_FILES = ("adapter", "checkpoints", "tensorboard", SUMMARY, "config.yaml", "loss.png", "samples.md",
             "history.json")


def log(message: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"mistral-qlora: {message}", file=sys.stderr, flush=True)


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
    # Root ignores permission bits, so ask the filesystem itself: create and remove a probe file
    # in the nearest folder that exists (nothing is left behind).
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    try:
        import tempfile

        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UserError(f"output_dir={str(out)!r} is not writable ({probe}: {exc.strerror})") from None


def clear_previous_run(out: Path) -> None:
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def run_fingerprint(cfg: RunConfig, train_examples: list[dict], world_size: int) -> dict:
    """What a checkpoint must agree with to be resumed: model and LoRA shape, data, batch geometry."""
    h = hashlib.sha256()
    for ex in train_examples:
        h.update(json.dumps([ex["input_ids"], ex["labels"]]).encode())
    return {
        "model": cfg.model.name_or_path,
        "revision": cfg.model.revision,
        "quantization": cfg.quantization.model_dump(),
        "lora": {"r": cfg.lora.r, "target_modules": cfg.lora.target_modules},
        "data": h.hexdigest(),
        "packing": cfg.data.tokens_per_row if cfg.data.packing else None,
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "world_size": world_size,
        "seed": cfg.train.seed,
    }


def find_resume_checkpoint(cfg: RunConfig, fingerprint: dict, overwrite: bool, force: bool) -> Path | None:
    root = checkpoints.checkpoints_root(cfg.output_dir)
    if overwrite:
        return None
    resume = cfg.train.resume
    if resume == "never":
        if checkpoints.complete_checkpoints(root):
            raise UserError(
                f"output_dir={cfg.output_dir!r} has checkpoints of an unfinished run and train.resume=never; "
                "set train.resume=auto to continue it or pass --overwrite to start again"
            )
        return None
    if resume == "auto":
        ckpt = checkpoints.newest_valid(root, warn=log)
    else:
        ckpt = Path(resume)
        if not ckpt.is_dir():
            raise UserError(f"train.resume={resume!r}: no such checkpoint folder")
        problem = checkpoints.verify(ckpt)
        if problem:
            raise UserError(f"train.resume={resume!r}: checkpoint is incomplete or corrupt: {problem}")
    if ckpt is not None:
        checkpoints.check_fingerprint(ckpt, fingerprint, force, warn=log)
    return ckpt


def training_arguments(cfg: RunConfig, rt: Runtime, has_eval: bool, deepspeed: str | None = None):
    """Created before the model is loaded: with a DeepSpeed config this is what tells transformers
    (is_deepspeed_zero3_enabled) and starts the process group the ZeRO-3 loader partitions over."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        # The Trainer writes checkpoints into a staging folder; CheckpointCommitCallback seals them.
        output_dir=str(checkpoints.staging_root(cfg.output_dir)),
        save_total_limit=None,  # rotation happens on committed checkpoints (train.keep_checkpoints)
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
        logging_nan_inf_filter=False,  # a NaN must show (and stop the run), not be averaged away
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
        # The loss of a step is the mean over every answer token of the global batch (all
        # accumulated micro-batches, all ranks), not a mean of per-row or per-rank means.
        average_tokens_across_devices=True,
        dataloader_pin_memory=rt.device == "cuda",
        deepspeed=deepspeed,
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every step
        log_on_each_node=False,  # one log, from global rank 0
    )


def oom_message(cfg: RunConfig, stage: str) -> str:
    used = ""
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        used = f" (peak {torch.cuda.max_memory_allocated() / 2**30:.1f} of {total:.1f} GiB)"
    hints = [f"data.tokens_per_row (now {cfg.data.tokens_per_row})" if cfg.data.packing
             else f"train.micro_batch_size (now {cfg.train.micro_batch_size})"]
    if cfg.train.gradient_checkpointing is not True:
        hints.append("set train.gradient_checkpointing=true (or train.memory=low)")
    hints.append("or shard the model with train.strategy=zero3 over more GPUs")
    return f"CUDA out of memory while {stage}{used}: lower " + ", ".join(hints) + "; checkpoints are intact"


def run_training(cfg: RunConfig, overwrite: bool = False, force: bool = False) -> dict:
    try:
        return _run_training(cfg, overwrite, force)
    except torch.OutOfMemoryError:
        raise UserError(oom_message(cfg, "training")) from None


def _run_training(cfg: RunConfig, overwrite: bool, force: bool) -> dict:
    from transformers import PrinterCallback, Trainer, set_seed
    from transformers.integrations import TensorBoardCallback

    from mistral_qlora.callbacks import (STATS_ENV, AdapterCheckCallback, CheckpointCommitCallback,
                                         CompletedCheckpointCallback, DistStatsCallback, DivergenceCallback,
                                         PreemptionCallback, RecordingDataset, RunAlreadyComplete,
                                         SamplesCallback, ThroughputCallback)
    from mistral_qlora.data import prepare_data
    from mistral_qlora.distributed import (barrier, gpu_budget, is_zero3, launched_processes, lora_target_names,
                                           plan_strategy, single_process_env)
    from mistral_qlora.flops import flops_per_token, peak_flops
    from mistral_qlora.generate import generate_answers
    from mistral_qlora.modeling.attention import TAKES_CU_SEQLENS, select_attention
    from mistral_qlora.modeling.model import (add_lora, fused_lora_plan, keep_4bit_layout, load_base_model,
                                              load_model_config, resolve_model_path)
    from mistral_qlora.modeling.speed import (apply_kernels, plan_checkpointing, plan_kept_weights, select_kernels,
                                              set_kept_weights)
    from mistral_qlora.modeling.tokenizer import load_tokenizer

    started = time.time()
    out = Path(cfg.output_dir)
    check_output_dir(out, overwrite)
    rt = Runtime.detect(cfg.model.dtype)

    # 1. Data, and the checkpoint to resume: validated before anything is written.
    model_path = resolve_model_path(cfg.model.name_or_path)
    tokenizer = load_tokenizer(model_path, cfg.model.revision)
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed, cfg.eval.samples)
    attention = select_attention(cfg.model.attention, rt.dtype)
    kernels = select_kernels(cfg.model.kernels)
    fingerprint = run_fingerprint(cfg, data.train, rt.world_size)
    resume_from = find_resume_checkpoint(cfg, fingerprint, overwrite, force)

    # 2. Strategy, then the Trainer's arguments: both before the model, which ZeRO-3 loads
    #    straight into partitions over the process group the arguments start.
    strategy, why, ds_config = plan_strategy(cfg, rt.world_size)
    log(f"train.strategy={strategy} ({why})")
    if ds_config is not None and launched_processes() is None:
        single_process_env()
    args = training_arguments(cfg, rt, has_eval=bool(data.eval),
                              deepspeed=str(ds_config) if ds_config is not None else None)
    rt.world_size = args.world_size
    zero3 = is_zero3(strategy)
    model_config = load_model_config(model_path, cfg.model)
    budget = gpu_budget(rt.local_rank) if rt.device == "cuda" else None
    fused, fused_why = fused_lora_plan(cfg.lora, cfg.quantization.bits, zero3)
    checkpoint_layers, why = plan_checkpointing(cfg, model_config, rt.dtype.itemsize, kernels, budget, strategy,
                                                rt.world_size)
    log(f"train.gradient_checkpointing={cfg.train.gradient_checkpointing} ({why}); model.kernels={kernels}")
    log(f"lora: {fused_why}")
    if fused:
        kept_layers, why = plan_kept_weights(cfg, model_config, rt.dtype.itemsize, kernels, budget, checkpoint_layers,
                                             strategy, rt.world_size)
        log(f"lora: dequantized weights kept for backward: {why}")

    # 3. Model: 4-bit base + LoRA.
    load_stats = None
    if zero3:
        from mistral_qlora.modeling.zero3 import load_base_model_zero3

        hf_ds = args.hf_deepspeed_config
        hidden = model_config.hidden_size
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
    apply_kernels(model, kernels)  # before LoRA wraps the linears
    # Under ZeRO-3 + PEFT only reentrant checkpointing works (non-reentrant raises CheckpointError).
    # Seeded here: every rank, strategy and rerun starts from the same adapter.
    set_seed(cfg.train.seed)
    model = add_lora(model, cfg.lora, reentrant=zero3, checkpoint_layers=checkpoint_layers, fused=fused)
    if fused:
        set_kept_weights(model, checkpoint_layers, kept_layers)
    # Mistral ships no pad token; the tokenizer's stand-in (<unk>) is told to the model up front.
    model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    if zero3 and rt.dtype != torch.float32:
        # DeepSpeed keeps fp32 master weights and casts the module to bf16 itself, except for a model
        # ZeRO-3 built (ours): do it for the adapter, which PEFT created in fp32.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.to(rt.dtype)

    # 4. Output folder: only now is anything written, by rank 0 while the others wait.
    if rt.is_main:
        if overwrite:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.discard_staging(checkpoints.checkpoints_root(out))
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
    barrier()
    if resume_from is not None:
        log(f"resuming from {resume_from}")

    # 5. Train. Samples are generated by every rank in lockstep (ZeRO-3 gathers each layer
    #    collectively) once the engine is up, and written by rank 0 alone.
    cu = attention in TAKES_CU_SEQLENS
    per_token = flops_per_token(model_config, cfg.lora.r, lora_target_names(cfg.lora.target_modules),
                                data.train_stats.lengths)
    peak = peak_flops(torch.cuda.get_device_name(rt.local_rank) if rt.device == "cuda" else None,
                      cfg.train.peak_tflops)
    throughput = ThroughputCallback(per_token, peak * rt.world_size if peak else None)
    preemption = PreemptionCallback(log=log)
    divergence = DivergenceCallback()
    commit = CheckpointCommitCallback(fingerprint, cfg.train.keep_checkpoints)
    samples = SamplesCallback(model, tokenizer, data.sample_prompts, cfg.eval.max_new_tokens)
    # Order matters: a resumed run that is already complete stops after the samples and before
    # anything else starts (signal handlers, timers); divergence runs after preemption so a NaN
    # can veto the save it asks for, and the adapter check runs before the commit seals the
    # checkpoint.
    callbacks = [samples, CompletedCheckpointCallback(), throughput, preemption, divergence, AdapterCheckCallback(),
                 commit]
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
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except RunAlreadyComplete as done:
        # The checkpoint's weights and state are loaded and no callback after it has started
        # (no signal handler, progress bar or TensorBoard writer to close): finish from here.
        log(f"{resume_from.name} was saved at the run's last step ({done.step}): nothing left to train; "
            "writing the adapter and summary")

    if divergence.diverged_at is not None:
        last = checkpoints.complete_checkpoints(checkpoints.checkpoints_root(out))
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved before it"
        raise UserError(
            f"training diverged: loss is {divergence.value} at step {divergence.diverged_at}; {keep}; "
            f"lower train.learning_rate (now {cfg.train.learning_rate}) or check the data"
        )
    if preemption.preempted_at is not None:
        raise Preempted(f"stopped at step {preemption.preempted_at} after saving {commit.last_committed}; "
                        "run the same command again to resume")

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
    publish_adapter(model, tokenizer, out, cfg.model.name_or_path, zero3=zero3, is_main=rt.is_main)
    summary = {
        "initial_eval_loss": initial_eval_loss,
        "final_eval_loss": final_eval_loss,
        "initial_eval_perplexity": perplexity(initial_eval_loss),
        "final_eval_perplexity": perplexity(final_eval_loss),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_tokens": trainer.state.num_input_tokens_seen,
        "tokens_per_second": throughput.tokens_per_second,
        "flops_per_token": per_token,
        "mfu": throughput.mfu,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if rt.device == "cuda" else None,
        "world_size": rt.world_size,
        "strategy": strategy,
        "attention_backend": attention,
        "kernels": kernels,
        "lora_layer": "fused" if fused else "peft",
        "checkpointed_layers": checkpoint_layers,
        "runtime_seconds": round(time.time() - started, 2),
        "resumed_from": str(resume_from) if resume_from else None,
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
        write_json(out / "history.json", history)
        plot_loss(out / "loss.png", history, f"{cfg.model.name_or_path}: QLoRA r={cfg.lora.r}")
        atomic_write_text(out / "samples.md", samples_markdown(data.sample_prompts, samples_before, samples_after))
        write_json(out / SUMMARY, summary)  # written last: its presence marks a finished run
    barrier()  # the others wait for rank 0's files, so the run ends when they exist
    return summary


def publish_adapter(model, tokenizer, out: Path, base_name: str, zero3: bool, is_main: bool) -> None:
    """Save (every rank joins: ZeRO-3 gathers) and check the adapter in a staging folder, then
    rename it into place, so `adapter/` is always whole."""
    from mistral_qlora.distributed import barrier
    from mistral_qlora.modeling.adapter import save_adapter

    staging, final = out / ".adapter-staging", out / "adapter"
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    save_adapter(model, tokenizer, staging, zero3=zero3, is_main=is_main)
    if is_main:
        record_base_model(staging, base_name)
        if final.exists():
            shutil.rmtree(final)
        os.rename(staging, final)
    barrier()


def record_base_model(adapter_dir: Path, name: str) -> None:
    """Name the base as the user did (tiny-random-mistral, a hub id), not by a cache path, so the
    adapter loads anywhere. Done after saving: PEFT looks the base up while it saves."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = name
    write_json(path, config)
