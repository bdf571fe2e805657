"""One training run, as named phases: validate -> plan -> build the model -> build the Trainer ->
train -> finish.

- validate: output_dir, the checkpoint's config and tokenizer, the data, the checkpoint to resume.
  Everything the user's input can get wrong fails here, before a byte is written to output_dir.
- plan: every decision from the config, the shapes and this machine (plan/), logged with why.
- build the model: from the plan (model/build.py), the same function the benchmark uses.
- build the Trainer: its arguments and callbacks (run/trainer.py).
- train: `Trainer.train`, resumed where a checkpoint says; checkpoints are staged and committed
  atomically (run/checkpoints.py), so a kill at any moment loses at most the steps since the last.
- finish: divergence and preemption end the run with their own errors; otherwise final
  evaluation, samples, the adapter (published whole), and the artifacts with summary.json last.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mistral_qlora.config import PREFERENCE_METHODS, RunConfig
from mistral_qlora.data import TrainingData, build_data
from mistral_qlora.data.dataset import source_lines
from mistral_qlora.data.token_cache import cache_root
from mistral_qlora.data.stream import POSITION_FILE as STREAM_POSITION
from mistral_qlora.errors import Preempted, UserError
from mistral_qlora.files import atomic_write_text
from mistral_qlora.flops import flops_per_token, lora_target_names, peak_flops
from mistral_qlora.logs import close_run_log, open_run_log
from mistral_qlora.model.adapter import publish_adapter
from mistral_qlora.model.base import load_model_config, resolve_model_path
from mistral_qlora.plan.context import check_max_seq_len
from mistral_qlora.model.build import build_model
from mistral_qlora.model.greedy import greedy_answers
from mistral_qlora.model.lora import check_init_adapter
from mistral_qlora.model.tokenizer import load_tokenizer
from mistral_qlora.plan import Plan, lora_variants, make_plan
from mistral_qlora.run import checkpoints, elastic
from mistral_qlora.run.artifacts import check_output_dir, clear_previous_run, perplexity, write_final_artifacts
from mistral_qlora.run.callbacks import RunAlreadyComplete
from mistral_qlora.run.model_card import write_model_card
from mistral_qlora.run.preference import (PreferenceTrainer, ReferenceCallback, ReferenceLogps, preference_accuracy,
                                          reference_key)
from mistral_qlora.run.task_eval import TaskSpec, before_after, prepare_tasks, tracker_metrics
from mistral_qlora.run.trackers import check_trackers, finish_trackers, tracker_env
from mistral_qlora.run.trainer import RunCallbacks, build_trainer, training_arguments
from mistral_qlora.run.watchdog import HANG_FILE
from mistral_qlora.runtime import Runtime, barrier, launched_processes, log, peak_memory, phase, single_process_env


def run_training(cfg: RunConfig, overwrite: bool = False, force: bool = False) -> dict:
    """Train as `cfg` says; returns the summary also written to output_dir/summary.json."""
    try:
        return _run_training(cfg, overwrite, force)
    except torch.OutOfMemoryError:
        raise UserError(oom_message(cfg, "training")) from None


def _run_training(cfg: RunConfig, overwrite: bool, force: bool) -> dict:
    started = time.time()
    rt = Runtime.detect(cfg.model.dtype)
    inputs = validate(cfg, rt, overwrite, force)
    plan = make_plan(cfg, inputs.model_config, rt)  # the last step that can refuse the run: log after it
    log(f"chat template: {inputs.data.template.describe()}")
    for line in source_lines(inputs.data.sources, cfg.data.mix):
        log(line)
    for warning in inputs.data.template.warnings:
        log(f"warning: {warning}")
    if cfg.train.method == "dpo":
        store = reference_store(cfg, rt, inputs, plan)
        if inputs.resume_from is not None and not store.exists():
            raise UserError(f"{store.path}: the DPO reference log-probs this run started with are gone, and the "
                            f"policy of {inputs.resume_from.name} is no longer the reference; --overwrite starts again")
    if plan.zero3 and cfg.eval.tasks:
        raise UserError(f"eval.tasks cannot be scored under {plan.strategy} (the model is partitioned over the ranks; "
                        "they are scored on rank 0): leave eval.tasks empty and run `mistral-qlora evaluate` on the "
                        "adapter, or set train.strategy to single or ddp")
    for line in plan.log_lines(cfg):
        log(line)
    check_checkpoint_strategy(inputs.resume_from, plan, force)
    if plan.ds_config is not None and launched_processes() is None:
        single_process_env()
    # Before the model: with a DeepSpeed config the arguments start the process group that
    # ZeRO-3 loads the base into. A checkpoint of another world size is read as DeepSpeed's
    # universal checkpoint (run/elastic.py).
    ds_config = plan.ds_config
    if ds_config is not None and elastic.needs_view(inputs.resume):
        ds_config = elastic.universal_ds_config(ds_config)
    args = training_arguments(cfg, rt, has_eval=bool(inputs.data.eval), deepspeed=ds_config)
    phase(f"model: loading {cfg.model.name_or_path} "
          f"({'4-bit NF4' if cfg.quantization.bits == 4 else '16-bit'}) and adding LoRA")
    model, load_stats = build_model(cfg, plan, rt, inputs.model_path, inputs.model_config,
                                    inputs.tokenizer.pad_token_id, args.hf_deepspeed_config if plan.zero3 else None)
    if load_stats is not None:
        log(load_stats.describe())
    start_output_dir(cfg, rt, overwrite)
    if rt.is_main:
        for note in tracker_env(cfg):
            log(note)
    resume_path = start_resume(cfg, rt, plan, inputs)
    per_token = flops_per_token(inputs.model_config, cfg.lora.r, lora_target_names(cfg.lora.target_modules),
                                inputs.data.train_stats.lengths,
                                trained_head="lm_head" in {m.rpartition(".")[2] for m in cfg.lora.modules_to_save})
    peak = peak_flops(torch.cuda.get_device_name(rt.local_rank) if rt.device == "cuda" else None,
                      cfg.train.peak_tflops)
    trainer, callbacks = build_trainer(cfg, rt, args, model, inputs.tokenizer, inputs.data, plan.attention,
                                       inputs.fingerprint, per_token, peak, inputs.resume_from,
                                       **preference_trainer(cfg, rt, inputs, plan))
    try:
        train(trainer, inputs.resume_from, rt, resume_path)
        if rt.is_main:
            elastic.discard_view(checkpoints.checkpoints_root(cfg.output_dir))
        summary = finish(cfg, rt, plan, inputs, trainer, callbacks, model, per_token, started)
        finish_trackers(callbacks.trackers, Path(cfg.output_dir), ok=True)
    except BaseException:
        finish_trackers(callbacks.trackers, None, ok=False)
        raise
    finally:
        if callbacks.watchdog is not None:
            callbacks.watchdog.stop()
        close_run_log()
    return summary


@dataclass
class RunInputs:
    """What the validate phase read and checked."""

    model_path: str
    model_config: object  # the checkpoint's transformers config, with the run's overrides
    tokenizer: object
    data: TrainingData
    fingerprint: dict
    resume_from: Path | None
    tasks: object = None  # lm-eval's TaskManager for eval.tasks, checked before the model loads
    resume: dict | None = None  # the resume's record (run/elastic.py): step, world sizes, what changed
    resumes: list | None = None  # every resume of this output_dir so far (resumes.json), rank 0


def validate(cfg: RunConfig, rt: Runtime, overwrite: bool, force: bool) -> RunInputs:
    """Read and check everything the run depends on; nothing is written. Each phase that can take a
    while says so in one line on stdout first, so a console in a pipe shows where the run is."""
    check_output_dir(Path(cfg.output_dir), overwrite)
    check_trackers(cfg)
    phase(f"config: checked; output_dir {cfg.output_dir}")
    model_path = resolve_model_path(cfg.model.name_or_path)
    model_config = load_model_config(model_path, cfg.model)
    check_max_seq_len(cfg, model_config)
    tokenizer = load_tokenizer(model_path, cfg.model.revision)
    if cfg.data.streaming and cfg.train.max_steps <= 0:
        raise UserError("data.streaming needs train.max_steps: a stream has no length to count epochs by")
    if cfg.lora.init_from:
        check_init_adapter(cfg.lora)
    phase("data: reading, tokenizing (or reading the token cache) and packing")
    data = build_data(cfg.data, tokenizer, cfg.train.seed, cfg.eval.samples)
    check_method(cfg, data)
    fingerprint = checkpoints.run_fingerprint(cfg, data.digest, rt.world_size)
    resume_from = checkpoints.find_resume_checkpoint(cfg, fingerprint, overwrite, force, warn=log)
    resume = None
    if resume_from is not None:
        resume = elastic.adapt_to_world_size(cfg, resume_from, rt.world_size, force)  # may set train.grad_accum
        fingerprint = checkpoints.run_fingerprint(cfg, data.digest, rt.world_size)
    if data.stream is not None and resume_from is not None:
        position = resume_from / STREAM_POSITION
        if not position.is_file():
            raise UserError(f"{resume_from}: no {STREAM_POSITION} (not saved by a streaming run); "
                            "--overwrite starts again")
        data.stream.resume(json.loads(position.read_text()))
    tasks = prepare_tasks(task_spec(cfg)) if cfg.eval.tasks else None
    return RunInputs(model_path, model_config, tokenizer, data, fingerprint, resume_from, tasks, resume)


def check_method(cfg: RunConfig, data: TrainingData) -> None:
    """train.method and the data's form agree: dpo/orpo train on pairs, sft on records."""
    method = cfg.train.method
    if method in PREFERENCE_METHODS and not data.preference:
        raise UserError(f"train.method={method} needs preference pairs (chosen/rejected); {describe_train(cfg)} "
                        "holds SFT records: give pairs (prompt/chosen/rejected records, docs/preference.md) or set "
                        "train.method=sft")
    if method == "sft" and data.preference:
        raise UserError(f"train.method=sft trains on answers, and {describe_train(cfg)} holds preference pairs "
                        "(chosen/rejected); set train.method=dpo or orpo, or give SFT records")


def describe_train(cfg: RunConfig) -> str:
    train = cfg.data.train
    return f"data.train ({train})" if isinstance(train, str) else f"data.train ({', '.join(s.path for s in train)})"


def reference_store(cfg: RunConfig, rt: Runtime, inputs: RunInputs, plan: Plan) -> ReferenceLogps:
    """Where DPO's reference log-probs of this run live: the data cache, keyed by base, adapter,
    data and how the model computes (run/preference.py)."""
    return ReferenceLogps(cache_root(cfg.data), reference_key(cfg, inputs.data.digest, plan.attention, rt.dtype))


def preference_trainer(cfg: RunConfig, rt: Runtime, inputs: RunInputs, plan: Plan) -> dict:
    """build_trainer's arguments for train.method dpo/orpo (none for sft): PreferenceTrainer, and
    for DPO the callback that gives the datasets their reference log-probs."""
    if cfg.train.method not in PREFERENCE_METHODS:
        return {}
    p = cfg.preference
    out = {"trainer_cls": PreferenceTrainer, "trainer_kwargs": {
        "method": cfg.train.method, "beta": p.beta, "loss_type": p.loss, "label_smoothing": p.label_smoothing}}
    if cfg.train.method == "dpo":
        store = reference_store(cfg, rt, inputs, plan)
        out["reference"] = lambda train, evals, collator: ReferenceCallback(
            store, train, evals, collator, rt.rank, rt.world_size, rt.is_main)
    return out


def task_spec(cfg: RunConfig) -> TaskSpec:
    e = cfg.eval
    return TaskSpec(list(e.tasks), limit=e.tasks_limit, num_fewshot=e.num_fewshot, include_path=e.include_path,
                    chat_template=e.chat_template,
                    where={"tasks": "eval.tasks", "limit": "eval.tasks_limit", "include_path": "eval.include_path"})


def check_checkpoint_strategy(ckpt: Path | None, plan: Plan, force: bool) -> None:
    """A DeepSpeed checkpoint keeps its optimizer in ZeRO files, DDP's and a single process's in
    optimizer.pt: a resume across the two would start the optimizer afresh, so it needs --force."""
    if ckpt is None:
        return
    saved_by_deepspeed = (ckpt / "latest").is_file()
    if saved_by_deepspeed != (plan.ds_config is not None) and not force:
        saved = "DeepSpeed (zero2/zero3)" if saved_by_deepspeed else "a single process or DDP"
        now = f"train.strategy={plan.strategy}"
        raise UserError(f"{ckpt} was saved by {saved} and this run is {now}: its optimizer state cannot be read; "
                        f"set train.strategy to {'zero2 or zero3' if saved_by_deepspeed else 'single or ddp'}, "
                        "or pass --force to resume the adapter with a fresh optimizer")


def start_resume(cfg: RunConfig, rt: Runtime, plan: Plan, inputs: RunInputs) -> Path | None:
    """The resume logged and recorded (resumes.json, rank 0); on another world size the folder the
    Trainer resumes from is a view of the checkpoint built by rank 0 (run/elastic.py)."""
    if inputs.resume is None:
        return None
    path = inputs.resume_from
    if rt.is_main:
        log(elastic.describe(inputs.resume))
        inputs.resumes = elastic.record_resume(Path(cfg.output_dir), inputs.resume)
    if elastic.needs_view(inputs.resume):
        if rt.is_main:
            elastic.resume_view(path, rt.world_size, inputs.resume["from_world_size"], plan.ds_config is not None)
        barrier()
        path = path.parent / elastic.VIEW / path.name
    return path


def start_output_dir(cfg: RunConfig, rt: Runtime, overwrite: bool) -> None:
    """The first write to output_dir, by rank 0 while the others wait: the previous run cleared
    (--overwrite), stale staging folders of a killed run discarded, the resolved config saved."""
    out = Path(cfg.output_dir)
    if rt.is_main:
        if overwrite:
            clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        checkpoints.discard_staging(checkpoints.checkpoints_root(out))
        hang = out / HANG_FILE
        if hang.is_file():
            log(f"the previous start ended on a hang (its stacks are in {out / 'run.log'}); resuming")
            hang.unlink()
        atomic_write_text(out / "config.yaml", cfg.to_yaml())
        open_run_log(out)  # with what was logged so far
    barrier()


def train(trainer, resume_from: Path | None, rt: Runtime, resume_path: Path | None = None) -> None:
    """`resume_path`: where the Trainer reads `resume_from` (a view of it on another world size)."""
    if resume_from is not None:
        log(f"resuming from {resume_from}")
    if rt.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resume_path = resume_path or resume_from
    try:
        trainer.train(resume_from_checkpoint=str(resume_path) if resume_path else None)
    except RunAlreadyComplete as done:
        # The checkpoint's weights and state are loaded and no callback after it has started
        # (no signal handler, progress bar or TensorBoard writer to close): finish from here.
        log(f"{resume_from.name} was saved at the run's last step ({done.step}): nothing left to train; "
            "writing the adapter and summary")


def finish(cfg: RunConfig, rt: Runtime, plan: Plan, inputs: RunInputs, trainer, callbacks: RunCallbacks, model,
           per_token: float, started: float) -> dict:
    """Stop a diverged or preempted run with its error; otherwise evaluate, publish the adapter,
    write the artifacts, summary.json last, and remove the checkpoints' staging folder once empty."""
    out = Path(cfg.output_dir)
    divergence, preemption = callbacks.divergence, callbacks.preemption
    if divergence.diverged_at is not None:
        last = checkpoints.complete_checkpoints(checkpoints.checkpoints_root(out))
        keep = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved before it"
        raise UserError(
            f"training diverged: loss is {divergence.value} at step {divergence.diverged_at}; {keep}; "
            f"lower train.learning_rate (now {cfg.train.learning_rate}) or check the data"
        )
    if preemption.preempted_at is not None:
        raise Preempted(f"stopped at step {preemption.preempted_at} after saving {callbacks.commit.last_committed}; "
                        "run the same command again to resume")

    data = inputs.data
    evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    if data.eval and (not evals or evals[-1]["step"] != trainer.state.global_step):
        trainer.evaluate()
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
    initial_eval_loss = evals[0]["eval_loss"] if evals else None
    final_eval_loss = evals[-1]["eval_loss"] if data.eval else None
    samples_after = greedy_answers(model, inputs.tokenizer, data.sample_prompts, cfg.eval.max_new_tokens,
                                     data.template)
    publish_adapter(model, inputs.tokenizer, out, cfg.model.name_or_path, zero3=plan.zero3, is_main=rt.is_main,
                    rope_scaling=cfg.model.rope_scaling)

    summary = summarize(cfg, rt, plan, inputs, trainer.state, callbacks, per_token, getattr(model.config, "sliding_window", None),
                        initial_eval_loss, final_eval_loss, started)
    if cfg.train.method in PREFERENCE_METHODS:
        summary["preference"] = preference_summary(cfg, trainer.state.log_history, callbacks)
        before_after_acc = {k: summary["preference"][k] for k in ("preference_accuracy_before",
                                                                 "preference_accuracy_after")}
        log("held-out preference accuracy: " + ", ".join(
            f"{k.rsplit('_', 1)[1]} {v:.1%}" for k, v in before_after_acc.items() if v is not None))
        trainer.log({f"eval_{k}": v for k, v in before_after_acc.items() if v is not None})
    if cfg.eval.tasks and rt.is_main:
        # rank 0 alone: the others wait at the barrier below
        summary["tasks"] = before_after(model, inputs.tokenizer, task_spec(cfg), inputs.tasks, data.template)
        trainer.log(tracker_metrics(summary["tasks"]))  # the trackers' on_log, at the last step
    if rt.is_main:
        # The card reads the summary in hand, so summary.json can still be written last.
        write_model_card(out / "adapter", "adapter", out / "adapter", cfg.model.name_or_path, inputs.model_path,
                         config=cfg.model_dump(mode="json"), summary=summary)
        write_final_artifacts(out, trainer.state.log_history, f"{cfg.model.name_or_path}: QLoRA r={cfg.lora.r}",
                              data.sample_prompts, callbacks.samples.before, samples_after, summary,
                              pairs=data.sample_pairs if cfg.train.method in PREFERENCE_METHODS else None)
        checkpoints.remove_empty_staging(checkpoints.checkpoints_root(out))
    barrier()  # the others wait for rank 0's files, so the run ends when they exist
    return summary


def summarize(cfg: RunConfig, rt: Runtime, plan: Plan, inputs: RunInputs, state, callbacks: RunCallbacks,
              per_token: float, sliding_window: int | None, initial_eval_loss: float | None,
              final_eval_loss: float | None, started: float) -> dict:
    """summary.json: the run's outcome, speed and shape in one flat record."""
    data = inputs.data
    throughput = callbacks.throughput
    peak_gib, peak_of = peak_memory(rt.device)
    return {
        "method": cfg.train.method,
        "initial_eval_loss": initial_eval_loss,
        "final_eval_loss": final_eval_loss,
        "initial_eval_perplexity": perplexity(initial_eval_loss),
        "final_eval_perplexity": perplexity(final_eval_loss),
        "steps": state.global_step,
        "epochs": state.epoch if data.stream is None else None,  # a stream has no epochs
        "stream_rows": state.global_step * callbacks.stream.rows_per_step if data.stream is not None else None,
        "train_tokens": state.num_input_tokens_seen,
        "tokens_per_second": throughput.tokens_per_second,
        "flops_per_token": per_token,
        "mfu": throughput.mfu,
        "peak_memory_gib": peak_gib,
        "peak_memory_of": peak_of,
        "world_size": rt.world_size,
        "strategy": plan.strategy,
        "attention_backend": plan.attention,
        "kernels": plan.kernels,
        "lora_layer": plan.layers.lora_layer,
        "lora_variants": lora_variants(cfg),
        "checkpointed_layers": plan.layers.recompute,
        "runtime_seconds": round(time.time() - started, 2),
        "resumed_from": str(inputs.resume_from) if inputs.resume_from else None,
        "resumes": inputs.resumes or [],
        "model": cfg.model.name_or_path,
        "sliding_window": sliding_window,
        "dtype": str(rt.dtype).removeprefix("torch."),
        "template": data.template.name if data.template is not None else None,
        "sources": [source_summary(s, data.sources) for s in data.sources],
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


PREFERENCE_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def preference_summary(cfg: RunConfig, history: list[dict], callbacks: RunCallbacks) -> dict:
    """summary.json's `preference`: the method and its settings, the last training log's loss and
    rewards, the final evaluation's, and the held-out preference accuracy (share of eval pairs
    whose chosen answer has the higher summed log-prob) before training (DPO: the reference pass;
    ORPO: the evaluation at the start) and after it (the final evaluation)."""
    train = [e for e in history if "loss" in e and "rewards/accuracies" in e]
    evals = [e for e in history if "eval_preference_accuracy" in e]
    reference = callbacks.reference.arrays if callbacks.reference is not None else None
    before = preference_accuracy(reference.get("eval")) if reference else None
    if before is None and evals and evals[0]["step"] == 0:
        before = evals[0]["eval_preference_accuracy"]
    return {
        "method": cfg.train.method,
        "beta": cfg.preference.beta,
        "loss_type": cfg.preference.loss if cfg.train.method == "dpo" else None,
        "label_smoothing": cfg.preference.label_smoothing if cfg.train.method == "dpo" else None,
        "train": {k: train[-1].get(k) for k in PREFERENCE_METRICS} if train else None,
        "eval": {k: evals[-1].get(f"eval_{k}") for k in PREFERENCE_METRICS} if evals else None,
        "preference_accuracy_before": before,
        "preference_accuracy_after": evals[-1]["eval_preference_accuracy"] if evals else None,
        "reference_computed": callbacks.reference.computed if callbacks.reference is not None else None,
    }


def source_summary(source, sources: list) -> dict:
    """One training source in summary.json: its weight's share, what was read and kept, and its
    share of the mix's draws (None for a stream, which is not counted while training)."""
    total_weight = sum(s.weight for s in sources) or 1.0
    total_drawn = sum(s.drawn for s in sources)
    return {"name": source.name, "hub": source.hub, "weight": source.weight / total_weight,
            "records": source.records if source.counted else None, "kept": source.kept if source.counted else None,
            "tokens": source.tokens if source.counted else None, "drawn": source.drawn if source.counted else None,
            "share": source.drawn / total_drawn if source.counted and total_drawn else None}


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
