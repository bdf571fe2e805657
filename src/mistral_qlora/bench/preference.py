"""`mistral-qlora bench --method dpo|orpo`: a preference step of ours against TRL's trainer, in one
process, on the same 4-bit base, LoRA shape, pairs and card.

- The pairs: synthetic prompt, chosen and rejected answers of lognormal lengths (--median, --sigma,
  --min-len, a record at most --max-len tokens) with random token ids. Both sides train exactly these
  ids: ours as packed rows of whole pairs (data/collator.py's PackedPairs, best-fit decreasing into
  --tokens-per-row), TRL's as its own padded batches of `pairs_per_batch` pairs, the mean number of
  pairs in our rows, so an average step carries the same real tokens (TRL batches a fixed number of
  pairs; it cannot batch by tokens). The first --warmup steps of each are untimed, the next
  --timed-rows timed.
- Ours (`fast` or any packed+... recipe): built by `make_plan` + `build_model` as `train` builds it,
  trained by run/preference.py's PreferenceTrainer; DPO's reference log-probs come from one
  `reference_pass` before training, timed on its own.
- TRL's (`trl`): its DPOTrainer with the same base loaded by `load_base_model` (SDPA: its batches are
  padded), LoRA through `peft_config` (same rank, alpha, dropout and all-linear targets), gradient
  checkpointing as ours, bf16; DPO runs twice, with `precompute_ref_log_probs` (its reference pass
  inside the trainer's construction, timed) and without (the adapter switched off for a second
  forward every step). ORPO: `trl.experimental.orpo.ORPOTrainer` where the installed TRL has it.
  TRL tokenizes text itself; the subclasses below hand it our ids instead, so both sides see the same
  tokens.
- Tokens/s: real tokens (prompt + answer of both records of each pair; padding not counted) of the
  timed steps, as the Trainer counts them (`include_num_input_tokens_seen`), over the timed steps'
  wall time between device synchronisations; peak memory: the allocator's peak over the timed steps
  (the model, its optimizer state and every activation included).
"""

from __future__ import annotations

import random
import tempfile
import time
from dataclasses import dataclass

import torch

from mistral_qlora.bench.options import BenchOptions
from mistral_qlora.bench.recipes import ALIASES, Recipe, build_recipe_model, expand_recipes, plan_lines, recipe_config
from mistral_qlora.bench.report import environment, now
from mistral_qlora.bench.run import free_memory
from mistral_qlora.bench.synthetic import lognormal_lengths
from mistral_qlora.data.collator import PackedCollator, PackedPairs
from mistral_qlora.data.packing import pack_best_fit_decreasing
from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.errors import UserError
from mistral_qlora.model.attention import TAKES_CU_SEQLENS
from mistral_qlora.model.base import load_base_model, load_model_config, resolve_model_path
from mistral_qlora.config import PREFERENCE_METHODS, ModelSection
from mistral_qlora.runtime import Runtime

TRL = "trl"
BETA = 0.1
FIRST_ID = 3  # random ids above <unk>, <s>, </s>


@dataclass
class PairSample:
    pairs: list[dict]  # prompt_ids, chosen_ids, rejected_ids (answers only)
    rows: list[list[int]]  # our packed rows of pair indices, in training order
    pairs_per_batch: int  # TRL's batch size: the mean pairs of our rows
    note: str

    def ours(self) -> list[dict]:
        """The pairs as data/preference.py's table rows: prompt + answer ids, the prompt unlabelled."""
        out = []
        for p in self.pairs:
            row = {}
            for side in ("chosen", "rejected"):
                row[f"{side}_ids"] = p["prompt_ids"] + p[f"{side}_ids"]
                row[f"{side}_labels"] = [IGNORE_INDEX] * len(p["prompt_ids"]) + p[f"{side}_ids"]
            out.append(row)
        return out

    def real_tokens(self, pair: int) -> int:
        p = self.pairs[pair]
        return 2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"])


def synthetic_pairs(opts: BenchOptions, vocab_size: int) -> PairSample:
    """The pairs of the first --warmup + --timed-rows packed rows of `opts.sequences` drawn pairs."""
    half = max(opts.min_len, opts.max_len // 2)
    median = max(opts.min_len, opts.median // 2)
    n = opts.sequences
    prompts, chosen, rejected = (lognormal_lengths(n, median, opts.sigma, half, opts.min_len, opts.seed + k)
                                 for k in range(3))
    rng = random.Random(opts.seed)

    def ids(k):
        return [rng.randrange(FIRST_ID, vocab_size) for _ in range(k)]

    pairs = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
             for p, c, r in zip(prompts, chosen, rejected)]
    lengths = [2 * p + c + r for p, c, r in zip(prompts, chosen, rejected)]
    if opts.tokens_per_row < max(lengths):
        raise UserError(f"--tokens-per-row ({opts.tokens_per_row}) must hold a whole pair: at least "
                        f"{max(lengths)} tokens here (two records of up to --max-len {opts.max_len}); raise it")
    rows = pack_best_fit_decreasing(lengths, opts.tokens_per_row, opts.seed)
    rng.shuffle(rows)
    steps = opts.warmup + opts.timed_rows
    if len(rows) < steps:
        raise UserError(f"only {len(rows)} rows of {opts.tokens_per_row} tokens in the pairs; need --warmup + "
                        f"--timed-rows = {steps} (add --sequences)")
    rows = rows[:steps]
    used = sorted(i for row in rows for i in row)
    index = {old: new for new, old in enumerate(used)}
    per_batch = max(1, round(len(used) / steps))
    note = (f"synthetic pairs: prompt and each answer lognormal, median {median}, sigma {opts.sigma}, "
            f"[{opts.min_len}, {half}] tokens; {len(used)} pairs in {steps} rows")
    return PairSample([pairs[i] for i in used], [[index[i] for i in row] for row in rows], per_batch, note)


@dataclass
class PreferenceResult:
    recipe: str
    trainer: str
    steps: int = 0
    pairs_per_step: float | None = None
    real_tokens: int = 0
    seconds: float = 0.0
    tokens_per_second: float | None = None
    peak_memory_gib: float | None = None
    reference_seconds: float | None = None  # DPO's reference pass, run once before training
    mean_loss: float | None = None
    vs_trl: float | None = None
    error: str | None = None


class StepTimer:
    """A TrainerCallback timing the steps after the first `warmup`: wall time between device
    synchronisations, the Trainer's count of input tokens, the allocator's peak."""

    def __init__(self, warmup: int, device: str):
        from transformers import TrainerCallback

        self.warmup, self.cuda = warmup, device == "cuda"
        self.start = self.tokens = None
        self.result: dict = {}
        self.losses: list[float] = []
        timer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step == timer.warmup:
                    timer._sync()
                    if timer.cuda:
                        torch.cuda.reset_peak_memory_stats()
                    timer.start, timer.tokens = time.perf_counter(), state.num_input_tokens_seen

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

            def on_train_end(self, args, state, control, **kwargs):
                timer._sync()
                seconds = time.perf_counter() - timer.start
                tokens = state.num_input_tokens_seen - timer.tokens
                timer.result = {"steps": state.global_step - timer.warmup, "real_tokens": int(tokens),
                                "seconds": round(seconds, 4), "tokens_per_second": tokens / seconds,
                                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if timer.cuda else None}

        self.callback = _Callback()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def _args_common(opts: BenchOptions, rt: Runtime, out: str, steps: int) -> dict:
    """The TrainingArguments both sides share."""
    return {"output_dir": out, "max_steps": steps, "learning_rate": opts.learning_rate, "lr_scheduler_type": "constant",
            "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
            "use_cpu": rt.device == "cpu", "bf16": rt.dtype == torch.bfloat16, "fp16": rt.dtype == torch.float16,
            "max_grad_norm": 1.0, "seed": opts.seed, "dataloader_num_workers": 0}


def run_ours(recipe: Recipe, opts: BenchOptions, method: str, sample: PairSample, path: str, model_config,
             rt: Runtime, out: str) -> PreferenceResult:
    from transformers import TrainingArguments

    from mistral_qlora.run.preference import PreferenceTrainer, reference_pass

    res = PreferenceResult(recipe.name, "PreferenceTrainer (ours)")
    model, plan = build_recipe_model(recipe, opts, path, model_config, rt, 0, method=method)
    for line in plan_lines(recipe, plan):
        print(line, flush=True)
    dataset = PackedPairs(sample.ours(), sample.rows)
    collator = PackedCollator(with_cu_seqlens=recipe.attention in TAKES_CU_SEQLENS)
    if method == "dpo":
        started = time.perf_counter()
        dataset.reference = reference_pass(model, dataset, collator, rt.torch_device)
        if rt.device == "cuda":
            torch.cuda.synchronize()
        res.reference_seconds = round(time.perf_counter() - started, 3)
    timer = StepTimer(opts.warmup, rt.device)
    args = TrainingArguments(**_args_common(opts, rt, out, len(sample.rows)), per_device_train_batch_size=1,
                             remove_unused_columns=False, include_num_input_tokens_seen="all")
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                callbacks=[timer.callback], method=method, beta=BETA)
    _quiet(trainer)
    trainer.train()
    res.pairs_per_step = len(sample.pairs) / len(sample.rows)
    _fill(res, timer)
    return res


def _trl_trainers(method: str):
    """(TRL's trainer class, its config class) for `method`, subclassed to take our token ids."""
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        class IdsDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already prompt_ids / chosen_ids / rejected_ids

        return IdsDPOTrainer, DPOConfig
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    except ImportError:
        try:
            from trl import ORPOConfig, ORPOTrainer
        except ImportError:
            return None, None

    class IdsORPOTrainer(ORPOTrainer):
        def tokenize_row(self, feature, model=None):
            prompt = feature["prompt_ids"]
            out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = feature[f"{side}_ids"]
                out[f"{side}_input_ids"] = prompt + answer
                out[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                out[f"{side}_labels"] = [IGNORE_INDEX] * len(prompt) + answer
            return out

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # its batches carry chosen_/rejected_ inputs, which the Trainer's token count does not read
            if model.training:
                self.state.num_input_tokens_seen += int(inputs["chosen_attention_mask"].sum()
                                                        + inputs["rejected_attention_mask"].sum())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    return IdsORPOTrainer, ORPOConfig


def run_trl(opts: BenchOptions, method: str, sample: PairSample, path: str, model_config, rt: Runtime, out: str,
            precompute: bool | None) -> PreferenceResult:
    from datasets import Dataset
    from peft import LoraConfig

    from mistral_qlora.model.tokenizer import load_tokenizer

    name = TRL if precompute is None else f"{TRL} (precompute_ref_log_probs={str(precompute).lower()})"
    trainer_cls, config_cls = _trl_trainers(method)
    if trainer_cls is None:
        import trl

        return PreferenceResult(name, "-", error=f"TRL {trl.__version__} has no ORPOTrainer")
    res = PreferenceResult(name, f"{trainer_cls.__mro__[1].__name__} (TRL)")
    cfg = recipe_config(Recipe.parse("packed+sdpa"), opts, path, method=method)
    device_map = {"": rt.local_rank} if rt.device == "cuda" else None
    base = load_base_model(path, model_config, None, cfg.quantization, "sdpa", rt.dtype, device_map=device_map)
    tokenizer = load_tokenizer(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    columns = {k: [p[k] for p in sample.pairs] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    if method == "orpo":
        columns.update({k: [""] * len(sample.pairs) for k in ("prompt", "chosen", "rejected")})
    steps = -(-len(sample.pairs) // sample.pairs_per_batch)
    timer = StepTimer(opts.warmup, rt.device)
    kwargs = {"beta": BETA, "max_length": None, "gradient_checkpointing": opts.gradient_checkpointing,
              "disable_dropout": False, "include_num_input_tokens_seen": "non_padding",
              "per_device_train_batch_size": sample.pairs_per_batch}
    if method == "dpo":
        kwargs["precompute_ref_log_probs"] = bool(precompute)
    else:
        kwargs.update(max_length=2 * opts.max_len, remove_unused_columns=False, include_num_input_tokens_seen="no")
    args = config_cls(**_args_common(opts, rt, out, steps), **kwargs)
    started = time.perf_counter()
    trainer = trainer_cls(model=base, args=args, train_dataset=Dataset.from_dict(columns), processing_class=tokenizer,
                          peft_config=lora, callbacks=[timer.callback])
    if precompute:
        if rt.device == "cuda":
            torch.cuda.synchronize()
        res.reference_seconds = round(time.perf_counter() - started, 3)
    _quiet(trainer)
    trainer.train()
    res.pairs_per_step = sample.pairs_per_batch
    _fill(res, timer)
    return res


def _quiet(trainer) -> None:
    """No log dict printed per step: the bench prints its own lines."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)


def _fill(res: PreferenceResult, timer: StepTimer) -> None:
    for k, v in timer.result.items():
        setattr(res, k, v)
    if timer.losses:
        res.mean_loss = sum(timer.losses) / len(timer.losses)


def check_recipes(names: list[str] | None, method: str) -> list[str]:
    """The recipes of a preference bench (default: trl, fast); the padded SFT baselines refused."""
    names = names or [TRL, "fast"]
    for n in names:
        if n in ALIASES:
            raise UserError(f"--method {method} --recipes {n}: the padded baseline of a preference run is TRL's "
                            f"trainer (recipe {TRL}); use {TRL}, fast or packed+BACKEND recipes")
    return names


def run_preference_bench(opts: BenchOptions, method: str) -> dict:
    if method not in PREFERENCE_METHODS:
        raise UserError(f"--method {method}: use sft, dpo or orpo")
    names = check_recipes(opts.recipes, method)
    rt = Runtime.detect(opts.dtype)
    if TRL in names:
        try:
            import trl  # noqa: F401
        except ImportError:
            raise UserError("--recipes trl needs TRL (pip install trl)") from None
    ours_names = [n for n in names if n != TRL]
    ours = [Recipe.parse(r) for r in expand_recipes(ours_names, rt.dtype)] if ours_names else []
    for r in ours:
        r.check_usable(rt.dtype)
    path = resolve_model_path(opts.model, random_dir=opts.model_dir)
    model_config = load_model_config(path, ModelSection(name_or_path=path, sliding_window=opts.sliding_window))
    sample = synthetic_pairs(opts, model_config.vocab_size)
    runs = []
    if TRL in names:  # first: Liger patches classes for the whole process
        runs += [lambda out, p=p: run_trl(opts, method, sample, path, model_config, rt, out, p)
                 for p in ((True, False) if method == "dpo" else (None,))]
    ours.sort(key=lambda r: r.kernels == "liger")
    runs += [lambda out, r=r: run_ours(r, opts, method, sample, path, model_config, rt, out) for r in ours]
    results = []
    for run in runs:
        with tempfile.TemporaryDirectory(prefix="bench-pref-") as out:
            try:
                res = run(out)
            except Exception as exc:  # one side failing must not lose the other's numbers
                res = PreferenceResult("?", "?", error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
        free_memory()
        print(f"bench: {res.recipe}: {res.tokens_per_second or 0:,.0f} real tokens/s, peak "
              f"{res.peak_memory_gib or 0:.1f} GiB" + (f" ({res.error})" if res.error else ""), flush=True)
        results.append(res)
    trl_best = max((r.tokens_per_second for r in results if r.recipe.startswith(TRL) and r.tokens_per_second),
                   default=None)
    for r in results:
        if trl_best and r.tokens_per_second and not r.recipe.startswith(TRL):
            r.vs_trl = r.tokens_per_second / trl_best
    from dataclasses import asdict

    return {"date": now(), "method": method, "model": opts.model, "environment": environment(rt.dtype),
            "pairs": sample.note, "pairs_per_trl_batch": sample.pairs_per_batch, "tokens_per_row": opts.tokens_per_row,
            "warmup_steps": opts.warmup, "timed_steps": opts.timed_rows, "beta": BETA,
            "results": [asdict(r) for r in results]}


def format_preference_report(report: dict) -> str:
    lines = [f"{report['method'].upper()} on {report['model']}: {report['pairs']}; TRL batches "
             f"{report['pairs_per_trl_batch']} pairs, ours rows of {report['tokens_per_row']} tokens",
             f"{'recipe':52} {'tokens/s':>10} {'peak GiB':>9} {'ref pass s':>10} {'vs TRL':>7}"]
    for r in report["results"]:
        if r["error"]:
            lines.append(f"{r['recipe']:52} failed: {r['error']}")
            continue
        ref = f"{r['reference_seconds']:.1f}" if r["reference_seconds"] is not None else "-"
        vs = f"{r['vs_trl']:.2f}x" if r["vs_trl"] else "-"
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{r['recipe']:52} {r['tokens_per_second']:>10,.0f} {peak:>9} {ref:>10} {vs:>7}")
    return "\n".join(lines)
