"""The transformers `Trainer` of a run: its arguments from the run config, its callbacks in order, and
its extensions (`RunTrainer`): the eval loss is the mean over every answer token of the eval set, and
the optimizer takes LoRA+ param groups through the Trainer's `create_optimizer` hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from mistral_qlora.config import RunConfig
from mistral_qlora.data import TrainingData
from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.logs import progress_bars
from mistral_qlora.model.attention import TAKES_CU_SEQLENS
from mistral_qlora.run.callbacks import (AdapterCheckCallback, CheckpointCommitCallback, CompletedCheckpointCallback,
                                         DivergenceCallback, EvalPerplexityCallback, PreemptionCallback,
                                         SamplesCallback, StreamPositionCallback, ThroughputCallback)
from mistral_qlora.run.checkpoints import staging_root
from mistral_qlora.run.console import ConsoleCallback
from mistral_qlora.run.sampler import GlobalOrderSampler
from mistral_qlora.run.straggler import StragglerCallback
from mistral_qlora.run.trackers import run_name, tracker_callbacks
from mistral_qlora.run.watchdog import HangWatchdog
from mistral_qlora.runtime import Runtime, log


def training_arguments(cfg: RunConfig, rt: Runtime, has_eval: bool, deepspeed: Path | dict | None = None):
    """Created before the model is loaded: with a DeepSpeed config this is what tells transformers
    (is_deepspeed_zero3_enabled) and starts the process group the ZeRO-3 loader partitions over."""
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        # The Trainer writes checkpoints into a staging folder; CheckpointCommitCallback seals them.
        output_dir=str(staging_root(cfg.output_dir)),
        save_total_limit=None,  # rotation happens on committed checkpoints (train.keep_checkpoints)
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.micro_batch_size,
        # One eval item per forward: a packed row of micro_batch_size * tokens_per_row tokens, or one
        # record unpacked (TrainingData.eval_dataset), so each rank's (loss sum, tokens) is one item's.
        per_device_eval_batch_size=1,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        # Not a mix-up: transformers 5 dropped `warmup_ratio` and reads a `warmup_steps` below 1 as a
        # fraction of the total steps, so the ratio goes here.
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
        report_to="none",  # the trackers are added explicitly, after our metrics callbacks (run/trackers.py)
        run_name=run_name(cfg),
        # progress bars on a terminal only (logs.progress_bars): in a pipe or a log file each redraw is a line
        disable_tqdm=not (rt.is_main and progress_bars()),
        neftune_noise_alpha=t.neftune_alpha,
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        # The loss of a step is the mean over every answer token of the global batch (all
        # accumulated micro-batches, all ranks), not a mean of per-row or per-rank means.
        average_tokens_across_devices=True,
        dataloader_pin_memory=rt.device == "cuda",
        deepspeed=str(deepspeed) if isinstance(deepspeed, Path) else deepspeed,
        ddp_find_unused_parameters=False,  # every LoRA parameter takes part in every step
        # The process group's timeout: a collective whose peer died or hung fails after it (NCCL's
        # async error handling is on: relaunch.child_env); the hang watchdog fires first.
        ddp_timeout=int(max(1800, 2 * t.hang_timeout)) if isinstance(t.hang_timeout, (int, float)) else 1800,
        log_on_each_node=False,  # one log, from global rank 0
        # Streaming: the stream itself resumes at the checkpoint's position (data/stream.py), so
        # the Trainer must not skip batches again; every process reads the stream and keeps its own
        # share of the batches (rows of different lengths cannot be dispatched from one process).
        ignore_data_skip=cfg.data.streaming,
        accelerator_config={"dispatch_batches": False} if cfg.data.streaming else None,
    )


class RunTrainer(Trainer):
    """The Trainer with the eval loss as the mean over ALL answer tokens of the eval set: each eval
    forward's loss sum and answer-token count are gathered (accelerate's gather_for_metrics, which
    drops the items a rank repeats to even out the last batch) and summed over batches and ranks;
    the Trainer's own eval loss, a mean of per-batch means, is replaced by their ratio. With LoRA+
    (lora.plus_lr_ratio) the optimizer `train.optimizer` names is built by PEFT's
    `create_loraplus_optimizer`, B's learning rate the ratio times A's."""

    _eval_totals: torch.Tensor | None = None  # [sum of token losses, answer tokens] while evaluating
    _order: GlobalOrderSampler | None = None

    def __init__(self, *args, loraplus_lr_ratio: float | None = None, global_batch: int | None = None,
                 order_seed: int = 0, **kwargs):
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.global_batch, self.order_seed = global_batch, order_seed
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset=None):
        """The run's global order (run/sampler.py) over a dataset with a length; a stream keeps its own."""
        dataset = self.train_dataset if train_dataset is None else train_dataset
        if self.global_batch is None or isinstance(dataset, torch.utils.data.IterableDataset):
            return super()._get_train_sampler(train_dataset)
        self._order = GlobalOrderSampler(len(dataset), self.global_batch, self.order_seed)
        return self._order

    def get_resumed_dataloader(self, dataloader, num_batches):
        # accelerate's skipping wrapper does not pass set_epoch on to the sampler: the resumed
        # epoch is the one the checkpoint's step falls in.
        if self._order is not None:
            self._order.set_epoch(self.state.global_step // self._order.steps_per_epoch)
        return super().get_resumed_dataloader(dataloader, num_batches)

    def create_optimizer(self, model=None):
        if self.loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from peft.optimizers import create_loraplus_optimizer

        model = self.model if model is None else model
        optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        lr = kwargs.pop("lr", self.args.learning_rate)
        self.optimizer = create_loraplus_optimizer(model, optimizer_cls, lr=lr,
                                                   loraplus_lr_ratio=self.loraplus_lr_ratio,
                                                   weight_decay=self.args.weight_decay, **kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._eval_totals is None:  # training
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # The model's loss is the mean over this forward's answer tokens (labels shift by one, so
        # position 0 never counts); no cross-rank scaling here: the totals are summed over ranks.
        tokens = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=None)
        total = torch.where(tokens > 0, loss.detach().double() * tokens, 0.0)  # no answer token: 0, not NaN
        part = torch.stack([total, tokens.double()]).to(self._eval_totals.device)
        self._eval_totals += self.accelerator.gather_for_metrics(part[None]).sum(0)
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_totals = torch.zeros(2, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            loss_sum, tokens = self._eval_totals.tolist()
        finally:
            self._eval_totals = None
        if tokens > 0:
            output.metrics[f"{metric_key_prefix}_loss"] = loss_sum / tokens
        return output


@dataclass
class RunCallbacks:
    """The callbacks whose outcome the run reads after training."""

    samples: SamplesCallback
    throughput: ThroughputCallback
    preemption: PreemptionCallback
    divergence: DivergenceCallback
    commit: CheckpointCommitCallback
    stream: StreamPositionCallback | None = None
    reference: TrainerCallback | None = None  # DPO's reference log-probs (run/preference.py)
    straggler: StragglerCallback | None = None
    watchdog: HangWatchdog | None = None
    console: ConsoleCallback | None = None  # global rank 0
    trackers: list = field(default_factory=list)  # global rank 0: train.report_to's (run/trackers.py)

    def ordered(self) -> list:
        # Order matters: a resumed run that is already complete stops after the samples and before
        # anything else starts (signal handlers, timers); the samples' time is not counted as
        # training; divergence runs after preemption so a NaN can veto the save it asks for; the
        # adapter check runs before the commit seals the checkpoint, and the stream's position is
        # written into the checkpoint before the commit seals it; the console and the trackers come
        # after the callbacks that add tokens/s, MFU and perplexity to the logs.
        # The straggler report adds its per-rank times to the logs before the console and the
        # trackers read them. The watchdog starts after the samples (not a step) and comes last, so
        # a step ends for it only after every collective the other callbacks make at its end.
        stream = [self.stream] if self.stream is not None else []
        shown = [self.console] if self.console is not None else []
        # DPO's reference comes before the completed-run stop: the final evaluation needs it too.
        reference = [self.reference] if self.reference is not None else []
        watch = [self.watchdog] if self.watchdog is not None else []
        straggler = [self.straggler] if self.straggler is not None else []
        return [self.samples, *reference, CompletedCheckpointCallback(), self.throughput, self.preemption, self.divergence,
                AdapterCheckCallback(), *stream, self.commit, EvalPerplexityCallback(), *straggler, *shown,
                *self.trackers, *watch]


def build_trainer(cfg: RunConfig, rt: Runtime, args, model, tokenizer, data: TrainingData, attention: str,
                  fingerprint: dict, flops_per_token: float, peak_flops: float | None, resume_from: Path | None = None,
                  trainer_cls=None, trainer_kwargs: dict | None = None, reference=None):
    """(Trainer, RunCallbacks). Samples are generated by every rank in lockstep (ZeRO-3 gathers
    each layer collectively) once the engine is up, and written by rank 0 alone. `trainer_cls`
    (RunTrainer or a subclass, such as run/preference.py's) is built with `trainer_kwargs`;
    `reference(train_dataset, eval_dataset, collator)` makes the callback that gives DPO's
    datasets their reference log-probs."""
    from transformers import PrinterCallback, ProgressCallback

    callbacks = RunCallbacks(
        samples=SamplesCallback(model, tokenizer, data.sample_prompts, cfg.eval.max_new_tokens, data.template),
        throughput=ThroughputCallback(flops_per_token, peak_flops * rt.world_size if peak_flops else None),
        preemption=PreemptionCallback(log=log),
        divergence=DivergenceCallback(),
        commit=CheckpointCommitCallback(fingerprint, cfg.train.keep_checkpoints),
        stream=StreamPositionCallback(data.stream, cfg.train.micro_batch_size * cfg.train.grad_accum * rt.world_size,
                                      resume_from) if data.stream is not None else None,
        straggler=StragglerCallback(rt.rank, rt.world_size, cfg.train.straggler_factor, warn=log),
        watchdog=HangWatchdog(cfg.train.hang_timeout, cfg.output_dir, rt.rank, log=log)
        if cfg.train.hang_timeout is not None else None,
        console=ConsoleCallback(bars=not args.disable_tqdm) if rt.is_main else None,
        trackers=tracker_callbacks(cfg) if rt.is_main else [],
    )
    train_dataset = data.train_dataset()
    eval_dataset = data.eval_dataset(cfg.train.micro_batch_size, cfg.train.seed)
    collator = data.collator(tokenizer.pad_token_id, with_cu_seqlens=attention in TAKES_CU_SEQLENS)
    if reference is not None:
        callbacks.reference = reference(train_dataset, eval_dataset, collator)
    trainer = (trainer_cls or RunTrainer)(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks.ordered(),
        loraplus_lr_ratio=cfg.lora.plus_lr_ratio,
        global_batch=cfg.train.micro_batch_size * cfg.train.grad_accum * rt.world_size,
        order_seed=cfg.train.seed,
        **(trainer_kwargs or {}),
    )
    # The Trainer's own printers show each log as a dict; ConsoleCallback (rank 0) takes their place.
    for cb in list(trainer.callback_handler.callbacks):
        if type(cb) in (PrinterCallback, ProgressCallback):  # not ConsoleCallback, a ProgressCallback too
            trainer.remove_callback(cb)
    return trainer, callbacks
