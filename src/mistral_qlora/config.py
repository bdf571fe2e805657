"""The run config: one YAML file plus `--set a.b=value` overrides, validated into one `RunConfig`.

Every key is declared here, with its default, its allowed range and its description (from which
docs/config.md is generated: tools/config_reference.py). A value outside the range, a wrong type
or an unknown key is refused with a message naming the key; nothing is changed silently.

Rules between keys that depend on nothing but the config (`config_problems`: a packed row must
hold the longest sequence, streaming's needs, what ZeRO-3 and FP8 cannot run with) are checked here
too, in `load_config`, before any file is read. Rules that depend on the machine or the launcher
(`train.strategy: auto` resolving to ZeRO-3, FP8 on a GPU without FP8 tensor cores) are the plan's
(plan/).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mistral_qlora.errors import UserError

TINY_MODEL = "tiny-random-mistral"
RANDOM_7B = "random:mistral-7b"  # Mistral-7B's architecture with random weights (model/builtin.py)
ZERO3_STRATEGIES = ("zero3", "zero3_offload")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _key(default, description: str, **bounds):
    """A config key: its default, its allowed range, and the description docs/config.md shows."""
    return Field(default, description=description, **bounds)


ROPE_SCALING_TYPES = ("linear", "dynamic", "yarn")
PREFERENCE_METHODS = ("dpo", "orpo")  # train.method values that train on preference pairs


class ModelSection(_Section):
    """The base checkpoint and how its layers run."""

    name_or_path: str = _key(
        TINY_MODEL, "The base checkpoint: `tiny-random-mistral` (embedded, made from a fixed seed), "
        "`random:mistral-7b` (Mistral-7B-Instruct-v0.2's architecture with random weights, built locally), "
        "a local checkpoint folder, or a hub id such as `mistralai/Mistral-7B-Instruct-v0.2`.")
    revision: str | None = _key(None, "Branch, tag or commit of a hub id; null for its default.")
    sliding_window: Union[Literal["auto"], None, int] = _key(
        "auto", "`auto` keeps the checkpoint's own attention window (none for Instruct-v0.2, 4096 for v0.1, "
        "64 for the tiny model); null removes it; an integer sets it.")
    attention: Literal["auto", "flash_attention_2", "varlen", "flex", "sdpa", "eager"] = _key(
        "auto", "Attention backend. `auto` takes the fastest usable one: flash_attention_2 (flash-attn), "
        "varlen (PyTorch's varlen flash kernel), flex, sdpa. `mistral-qlora env` lists what this machine "
        "can run; one asked for by name that cannot run is refused.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = _key(
        "auto", "Compute dtype; `auto` is bfloat16 on a GPU that supports it, float32 elsewhere.")
    kernels: Literal["auto", "liger", "none"] = _key(
        "auto", "Liger's fused Triton kernels: RoPE, RMSNorm, SwiGLU, and the lm_head fused with the loss so "
        "the logits are never materialised. `auto` uses them on a CUDA GPU where liger-kernel is installed "
        "(`pip install mistral-qlora[kernels]`).")
    rope_scaling: Union[dict[str, Any], None] = _key(
        None, "RoPE scaling for records longer than the checkpoint's trained context, as transformers takes it: "
        "`{type: linear|dynamic|yarn, factor: F}` plus that type's own keys (yarn: `original_max_position_embeddings`, "
        "`beta_fast`, `beta_slow`, ...). Written into the base's config when it loads, logged, and carried by the "
        "adapter's record, `merge` and `export`. null keeps the checkpoint's own.")

    @field_validator("rope_scaling")
    @classmethod
    def _rope_scaling(cls, v):
        if v is None:
            return v
        kind = v.get("type", v.get("rope_type"))
        if kind not in ROPE_SCALING_TYPES:
            raise ValueError(f"needs type: one of {', '.join(ROPE_SCALING_TYPES)} (got {kind!r})")
        factor = v.get("factor")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
            raise ValueError(f"needs factor: a number >= 1, how many times longer than the trained context "
                             f"(got {factor!r})")
        return v

    @field_validator("name_or_path")
    @classmethod
    def _random_architecture(cls, v):
        if v.startswith("random:") and v != RANDOM_7B:
            raise ValueError(f"the random architecture known here is {RANDOM_7B!r}")
        return v

    @field_validator("sliding_window")
    @classmethod
    def _window_positive(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("must be 'auto', null, or an integer >= 1")
        return v


class QuantizationSection(_Section):
    """How the frozen base is stored."""

    bits: Literal[4, 16] = _key(4, "4: the base in 4 bits through bitsandbytes (QLoRA); 16: plain LoRA on a "
                                   "16-bit base.")
    quant_type: Literal["nf4", "fp4"] = _key("nf4", "The 4-bit data type: nf4 (NormalFloat, QLoRA's) or fp4.")
    double_quant: bool = _key(True, "Quantize the 4-bit weights' block scales too (about 0.4 bits a weight less).")
    compute: Literal["bf16", "fp8"] = _key(
        "bf16", "What the frozen base weight's matmuls (forward and input gradient) run in. `fp8`: e4m3 with "
        "one scale per token and per output channel, fp32 accumulation, on the FP8 tensor cores of a GPU of "
        "compute capability 9.0 or newer (Hopper, Blackwell); the adapters, attention, norms and lm_head "
        "stay bf16. Opt-in: faster, at e4m3's rounding error on the base's matmuls. Refused where it cannot "
        "run (CPU, older GPUs, ZeRO-3, PEFT's LoRA layers), never ignored.")


class LoraSection(_Section):
    """The adapters that train."""

    r: int = _key(16, "LoRA rank: the inner dimension of each adapter's two matrices.", ge=1, le=1024)
    alpha: float = _key(32, "LoRA alpha: the adapter's output is scaled by alpha / r.", gt=0)
    dropout: float = _key(0.05, "Dropout on the input of each adapter.", ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = _key(
        "all-linear", "The linears that get an adapter: `all-linear` (every linear of the decoder layers; "
        "lm_head stays frozen) or a list of names such as `[q_proj, v_proj]`.")
    fused: bool = _key(
        True, "On a 4-bit base, fold each adapter into its base matmul with one autograd function "
        "(kernels/fused_lora.py): PEFT's math and PEFT's saved adapter, faster. false: PEFT's own layers, "
        "which ZeRO-3 always uses.")
    rslora: bool = _key(
        False, "Rank-stabilized LoRA: scale the adapter by alpha / sqrt(r) instead of alpha / r, so higher ranks "
        "keep learning; the fused layer supports it.")
    dora: bool = _key(
        False, "DoRA: each adapted weight split into a trained magnitude and a direction that LoRA updates. "
        "Runs on PEFT's layers (the plan logs why); slower than plain LoRA. Not with ZeRO-3.")
    plus_lr_ratio: Union[float, None] = _key(
        None, "LoRA+: the B matrices learn this many times faster than the A matrices (16 is the paper's "
        "choice); null for one learning rate.", gt=0)
    modules_to_save: list[str] = _key(
        [], "Modules trained in full and saved in the adapter besides the LoRA matrices, e.g. `[lm_head]` or "
        "`[embed_tokens]` (for new tokens or a new output format). Costs their full size in optimizer state.")
    init_from: str | None = _key(
        None, "An adapter folder (such as an SFT run's `RUN/adapter`) the LoRA weights start from instead of PEFT's "
        "initialization (B = 0): continues SFT from an adapter, and is DPO's reference model "
        "(docs/preference.md). Its rank, alpha, rsLoRA, DoRA and target modules must match this section's.")

    @field_validator("target_modules")
    @classmethod
    def _targets(cls, v):
        if isinstance(v, list) and (not v or any(not isinstance(n, str) or not n.strip() for n in v)):
            raise ValueError("must be all-linear or a non-empty list of module names such as [q_proj, v_proj]")
        return v

    @field_validator("modules_to_save")
    @classmethod
    def _to_save(cls, v):
        if any(not n.strip() for n in v):
            raise ValueError("module names must not be empty")
        return v


class DataSource(_Section):
    """One source of records in a list under data.train or data.eval."""

    path: str = _key(..., "A local JSON, JSONL, Parquet or CSV file, a glob of them, a folder written by "
                     "`datasets`, or a hub dataset id (read through `datasets.load_dataset`).")
    weight: float = _key(1.0, "Sampling ratio of this source in the training mix (relative to the other "
                         "sources' weights).", gt=0, allow_inf_nan=False)
    split: str | None = _key(None, "The split of a hub dataset or `datasets` folder; null takes `train`.")
    subset: str | None = _key(None, "The configuration (subset) name of a hub dataset.")
    columns: dict[str, str] = _key({}, "Our field names mapped to this source's columns, e.g. "
                                   "`{prompt: question, response: answer}`.")
    max_records: int | None = _key(None, "Read at most this many records of the source (its first ones).", ge=1)
    format: Union[None, Literal["auto", "text", "prompt_response", "instruction", "messages", "raw", "preference"]] = _key(
        None, "This source's record form, as `data.format` says it; null takes `data.format`. `raw` for "
        "documents trained on every token (docs/data.md#raw-documents).")


class DataSection(_Section):
    """What the run trains and evaluates on, and how it becomes rows."""

    train: Union[str, list[DataSource]] = _key(
        "dataset/story.json", "Training data: a path (JSON, JSONL, Parquet, CSV, a glob of them, a `datasets` "
        "folder or a hub dataset id; dataset/README.md shows the record forms) or a list of sources "
        "`{path, weight, split, subset, columns, max_records}` mixed by weight (docs/data.md). A relative path is "
        "read from the current directory, not the config file's folder (as `--set` paths are).")
    eval: Union[None, str, list[DataSource]] = _key(
        None, "Evaluation data in the same forms (every record of every source, no weights; relative paths from the "
        "current directory); null holds out `data.eval_fraction` of each training source.")
    mix: Literal["first_exhausted", "all_exhausted"] = _key(
        "first_exhausted", "Where a mix of several training sources ends: `first_exhausted` when a drawn source has "
        "no record left (no record repeated; the larger sources partly unused), `all_exhausted` once every record "
        "of every source has been drawn, the smaller sources repeated to keep their weight's share "
        "(docs/data.md#mixing-by-weight). `prepare` and the run's log say how much of each source is used.")
    eval_fraction: float = _key(0.1, "Share of the training records held out for evaluation when `data.eval` "
                                "is null (chosen with train.seed); 0 for none.", ge=0, lt=1)
    format: Literal["auto", "text", "prompt_response", "instruction", "messages", "raw", "preference"] = _key(
        "auto", "The records' form; `auto` reads it from the first record's keys: `text` "
        "(`<s>[INST] q [/INST] a </s>`), `prompt_response`, `instruction` (+ `input`), `messages`, `preference` "
        "(`chosen` + `rejected`, with `prompt` or `messages`, or as two conversations; docs/data.md#preference-pairs); a source "
        "of `.txt` files is `raw`. `raw` (never detected from `text` records): documents in a `text` column "
        "or `.txt` files, the loss on every token (docs/data.md#raw-documents).")
    template: Literal["auto", "mistral-v1", "mistral-v3", "mistral-v7", "mistral-tekken", "tokenizer"] = _key(
        "auto", "The chat template: `mistral-v1` (`[INST]` as text; Mistral-7B v0.1/v0.2), `mistral-v3` "
        "(`[INST]` control tokens; v0.3), `mistral-v7` (`[SYSTEM_PROMPT]`; the v7 SentencePiece vocabulary), "
        "`mistral-tekken` (a `tekken.json` vocabulary, its v3 or v7 format; Mistral-Nemo), all as mistral-common "
        "encodes them, tool calls included, or `tokenizer` (the checkpoint's own chat template). `auto`: the "
        "Mistral one for a Mistral tokenizer of that version, else the checkpoint's template "
        "(docs/data.md#templates).")
    max_seq_len: int = _key(512, "The longest a tokenized record may be; see `data.overlong`.",
                            ge=16, le=1_048_576)
    max_prompt_len: int | None = _key(
        None, "Preference pairs: the longest a prompt may be; a longer one loses its start (cut from the left, "
        "BOS kept), then answers are cut from the right to fit data.max_seq_len. null: only data.max_seq_len "
        "applies (docs/data.md#preference-pairs).", ge=1, le=1_048_576)
    overlong: Literal["auto", "truncate", "drop", "split"] = _key(
        "auto", "What happens to a longer record: `truncate` cuts it to data.max_seq_len, `drop` leaves "
        "it out (the summary counts both), `split` cuts a raw document into data.max_seq_len chunks, each a "
        "record of its own (raw sources only). `auto`: `split` for raw sources, `truncate` for chat records.")
    train_on_prompt: bool = _key(False, "Put the loss on the prompts too, not only on the answers.")
    packing: bool = _key(
        True, "Pack records into rows of data.tokens_per_row tokens that never attend across records; false "
        "pads batches of train.micro_batch_size records instead (the baseline).")
    tokens_per_row: int = _key(512, "Tokens per packed row; at least data.max_seq_len. With packing, "
                               "train.micro_batch_size counts rows.", ge=16, le=1_048_576)
    streaming: bool = _key(
        False, "Read the training sources as streams (for data larger than RAM or disk): mixed, tokenized and "
        "packed on the fly in a bounded buffer; needs train.max_steps, data.packing=true, and data.eval or data.eval_fraction=0.")
    stream_buffer: int = _key(2000, "Streaming: records tokenized and packed together; memory stays bounded by "
                              "this many records.", ge=1, le=10_000_000)
    num_proc: Union[Literal["auto"], int] = _key(
        "auto", "Processes that tokenize (datasets' map); `auto` is one per CPU core.")
    cache_dir: str | None = _key(
        None, "Where tokenized data is cached; null is $MISTRAL_QLORA_DATA_CACHE, else "
        "$MISTRAL_QLORA_CACHE/data, else ~/.cache/mistral-qlora/data.")

    @field_validator("train", "eval")
    @classmethod
    def _sources_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("a list of sources must name at least one source")
        return v

    @field_validator("num_proc")
    @classmethod
    def _num_proc_positive(cls, v):
        if isinstance(v, int) and not isinstance(v, bool) and v < 1:
            raise ValueError("must be 'auto' or an integer >= 1")
        return v


class TrainSection(_Section):
    """The optimisation, memory plan, processes, checkpoints and logs."""

    method: Literal["sft", "dpo", "orpo"] = _key(
        "sft", "What the run optimizes: `sft` (the answers' next-token loss), `dpo` (Direct Preference "
        "Optimization on chosen/rejected pairs against a reference model), `orpo` (the chosen answer's loss plus "
        "an odds-ratio preference term; no reference model). dpo and orpo need preference pairs "
        "(docs/preference.md).")

    epochs: float = _key(3, "Passes over the training data (a fraction allowed), unless train.max_steps is set.",
                         gt=0)
    max_steps: int = _key(-1, "Stop after this many optimizer steps; -1 runs train.epochs.", ge=-1)
    learning_rate: float = _key(2.0e-3, "Peak learning rate of the adapters (AdamW).", gt=0, le=1)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = _key(
        "cosine", "The learning-rate schedule after warm-up.")
    warmup_ratio: float = _key(0.03, "Share of the steps over which the learning rate warms up.", ge=0, lt=1)
    weight_decay: float = _key(0.0, "AdamW weight decay of the adapters.", ge=0)
    max_grad_norm: float = _key(1.0, "Gradient clipping norm; 0 turns clipping off.", ge=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adamw_8bit"] = _key(
        "adamw_torch", "The Trainer's optimizer: adamw_torch_fused on GPUs, paged_adamw_8bit or adamw_8bit "
        "(bitsandbytes) for less optimizer memory.")
    micro_batch_size: int = _key(1, "Rows (packed) or records (padded) per process per micro-step.",
                                 ge=1, le=4096)
    grad_accum: int = _key(1, "Micro-steps accumulated into one optimizer step.", ge=1, le=65536)
    gradient_checkpointing: Union[bool, Literal["auto"], float] = _key(
        True, "How many decoder layers recompute their activations in backward (a third more FLOPs, far "
        "less memory): true every layer, false none, a fraction such as 0.25 that share, `auto` as few as "
        "the GPU's memory allows (see train.memory; the choice and the estimate are logged).")
    activation_offload: Union[bool, Literal["auto"]] = _key(
        "auto", "Hold the hidden states saved at each recomputing layer's input in pinned host memory (copied on a "
        "side CUDA stream, fetched back one layer ahead in backward) instead of on the GPU: the longest rows. "
        "`auto` turns it on only when the rows would not fit the GPU otherwise (the estimate and the host memory "
        "it needs are logged); true needs some layer to recompute (train.gradient_checkpointing not false).")
    tiled_mlp: Union[bool, Literal["auto"]] = _key(
        "auto", "Compute the MLP of each recomputing layer over tiles of the sequence (hidden-size tokens each), "
        "so its intermediates exist one tile at a time in forward and backward: the longest rows, for one more "
        "forward of the MLP per step. `auto` turns it on only when the rows would not fit the GPU otherwise "
        "(with activation offload as chosen; the estimate is logged); true needs some layer to recompute and "
        "no ZeRO-3.")
    memory: Literal["auto", "low"] = _key(
        "auto", "What `auto` aims for. `auto` spends free GPU memory on speed: first fewer layers recompute, "
        "then layers keep their dequantized 16-bit weights for the whole run. `low` recomputes every layer "
        "(about 9 GiB for Mistral-7B at 8192-token rows).")
    strategy: Literal["auto", "single", "ddp", "zero2", "zero3", "zero3_offload"] = _key(
        "auto", "How the run is spread over processes: single, ddp, zero2, zero3 (the 4-bit base partitioned), "
        "zero3_offload. `auto`: single for one process, ddp when the 4-bit model and activations fit one GPU, "
        "zero3 when they do not.")
    seed: int = _key(42, "Seed of the eval split, the packing, the sampler, the adapters' initial values and "
                         "their dropout.", ge=0)
    eval_steps: int = _key(20, "Evaluate every this many optimizer steps (and before the first).", ge=1)
    save_steps: int = _key(50, "Save a checkpoint every this many optimizer steps.", ge=1)
    logging_steps: int = _key(5, "Log loss, learning rate, tokens/s and MFU every this many optimizer steps.",
                              ge=1)
    hang_timeout: Union[Literal["auto"], None, float] = _key(
        "auto", "Seconds within which every rank must finish a training step (a saving step: ten times that); "
        "past it each rank writes its Python stacks to run.log and the run exits with 76, saving nothing new, "
        "for a scheduler to requeue (docs/runs.md). `auto`: 20 times the median step time, at least 300 s; "
        "null turns the watchdog off.")
    straggler_factor: Union[float, None] = _key(
        1.5, "Warn on the console when one rank's forward time per step (median over a logging window) is this "
        "many times the other ranks' in 3 logging windows in a row; each window's per-rank min/median/max go to "
        "run.log and the trackers either way (run/straggler.py). null: no warning.", gt=1)
    keep_checkpoints: int = _key(2, "How many complete checkpoints to keep (the newest).", ge=1)
    resume: str = _key(
        "auto", "`auto` continues from the newest complete checkpoint in output_dir; `never` refuses to start "
        "over an unfinished run; a checkpoint folder resumes that checkpoint.")
    neftune_alpha: Union[float, None] = _key(
        None, "NEFTune: uniform noise of this scale (alpha / sqrt(tokens x hidden)) added to the input embeddings "
        "while training, never in evaluation or generation; 5 is the paper's usual value; null for none.", gt=0)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "none"]] = _key(
        ["tensorboard"], "Experiment trackers that get the config, per-step metrics, eval loss and perplexity, "
        "and the final summary.json, loss.png and samples.md: any of `tensorboard` (output_dir/tensorboard), "
        "`wandb`, `mlflow` (`pip install mistral-qlora[trackers]`), or `[none]`.")
    run_name: Union[str, None] = _key(
        None, "The run's name in the trackers; null names it after output_dir's last folder.")
    project: Union[str, None] = _key(
        None, "The W&B project and MLflow experiment the run goes to; null leaves the trackers' own defaults "
        "(or $WANDB_PROJECT / $MLFLOW_EXPERIMENT_NAME, which win over this key).")
    tags: list[str] = _key([], "Tags of the run in the trackers (W&B tags, MLflow tags).")
    peak_tflops: Union[float, None] = _key(
        None, "The GPU's dense bf16 peak in TFLOP/s, for the MFU in the logs; null looks it up from the device "
        "name (flops.py knows common GPUs) and logs no MFU for others.", gt=0)

    @field_validator("report_to")
    @classmethod
    def _report_to(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("names a tracker twice")
        if "none" in v and len(v) > 1:
            raise ValueError("`none` cannot be combined with trackers")
        return v

    @field_validator("hang_timeout")
    @classmethod
    def _hang_timeout_positive(cls, v):
        if isinstance(v, float) and not v > 0:
            raise ValueError("must be 'auto', null, or a number of seconds > 0")
        return v

    @field_validator("gradient_checkpointing")
    @classmethod
    def _fraction(cls, v):
        if isinstance(v, float) and not 0 < v < 1:
            raise ValueError("must be true, false, auto, or a fraction of the layers between 0 and 1")
        return v


class PreferenceSection(_Section):
    """Preference tuning (train.method dpo or orpo): docs/preference.md."""

    beta: float = _key(
        0.1, "DPO: how far the policy may move from the reference (the temperature of the implicit reward "
        "beta * (log pi - log pi_ref)); ORPO: the weight of the odds-ratio term.", gt=0, allow_inf_nan=False)
    loss: Literal["sigmoid", "ipo"] = _key(
        "sigmoid", "DPO's loss: `sigmoid` (the DPO paper's -log sigmoid(beta * margin)) or `ipo` (the squared "
        "distance of the length-averaged margin from 1 / (2 beta)). DPO only.")
    label_smoothing: float = _key(
        0.0, "Conservative DPO: the assumed share of pairs whose labels are flipped; the sigmoid loss then mixes "
        "in the flipped pair's loss with this weight. The sigmoid loss only.", ge=0, lt=0.5)


class EvalSection(_Section):
    """What a run shows of its model besides the loss."""

    samples: int = _key(3, "Held-out prompts answered greedily before and after training, in samples.md.",
                        ge=0, le=100)
    max_new_tokens: int = _key(32, "The longest answer generated for samples.md, in tokens.", ge=1, le=4096)
    tasks: list[str] = _key(
        [], "lm-evaluation-harness tasks scored after training with the adapter off (before) and on (after), on "
        "rank 0: the table goes into summary.json (`tasks`), the trackers and the console. Empty: none. Needs "
        "`pip install mistral-qlora[eval]`; the same as `mistral-qlora evaluate` (docs/evaluate.md).")
    tasks_limit: int | None = _key(None, "The first N examples of each of eval.tasks; null for all.", ge=1)
    num_fewshot: int | None = _key(None, "Examples in each prompt of eval.tasks; null for each task's own.", ge=0)
    include_path: str | None = _key(
        None, "A folder of lm-eval task YAMLs eval.tasks may name (local tasks such as dataset/tasks).")
    chat_template: bool = _key(
        True, "Score eval.tasks with the run's chat template applied (true) or as plain text (false).")


class RunConfig(_Section):
    """One run: every key below, validated before anything runs. The defaults are the embedded
    default run (configs/tiny.yaml)."""

    model: ModelSection = Field(default_factory=ModelSection)
    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    preference: PreferenceSection = Field(default_factory=PreferenceSection)
    eval: EvalSection = Field(default_factory=EvalSection)
    output_dir: str = _key("runs/tiny", "Where the run writes its adapter, checkpoints, logs, plots and summary.")

    @model_validator(mode="after")
    def _rules_between_keys(self):
        problems = config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Rules between keys


def data_problems(data: DataSection) -> list[str]:
    """What the data section asks for that cannot run, one line each naming the keys. The data
    step (data/dataset.py) checks a section built without a RunConfig with the same lines."""
    problems = []
    if data.packing and data.tokens_per_row < data.max_seq_len:
        problems.append(f"data.tokens_per_row ({data.tokens_per_row}) must be >= data.max_seq_len "
                        f"({data.max_seq_len}) so every sequence fits in a row; raise data.tokens_per_row or lower "
                        "data.max_seq_len")
    if data.streaming and not data.packing:
        problems.append("data.streaming packs rows as it reads; data.packing=false is not available with it")
    if data.streaming and data.eval is None and data.eval_fraction > 0:
        problems.append("data.streaming cannot hold out data.eval_fraction of a stream; set data.eval to "
                        "evaluation data, or data.eval_fraction=0 for none")
    return problems


def _fp8_problems(cfg: RunConfig) -> list[str]:
    """FP8 runs in the fused 4-bit LoRA layer only (kernels/fused_lora.py), in bfloat16. The
    config alone rules the fused layer out for PEFT's layers (lora.fused=false, a 16-bit base,
    DoRA) and for an explicit ZeRO-3 (DeepSpeed gathers the partitioned weights through module
    hooks the fused layer would bypass); `auto` resolving to ZeRO-3 is the plan's to refuse."""
    if cfg.quantization.compute != "fp8":
        return []
    problems = []
    if cfg.model.dtype in ("float16", "float32"):
        problems.append(f"quantization.compute=fp8 runs with model.dtype bfloat16 only (got "
                        f"model.dtype={cfg.model.dtype}); set model.dtype to bfloat16 or auto, or "
                        "quantization.compute=bf16")
    peft = [why for why, on in (
        ("lora.fused=false: PEFT's LoRA layers", not cfg.lora.fused),
        ("quantization.bits=16, a 16-bit base: PEFT's LoRA layers", cfg.quantization.bits != 4),
        ("lora.dora=true: PEFT's DoRA layers", cfg.lora.dora),
        (f"train.strategy={cfg.train.strategy}: PEFT's LoRA layers", cfg.train.strategy in ZERO3_STRATEGIES),
    ) if on]
    if peft:
        problems.append(f"quantization.compute=fp8 runs in the fused 4-bit LoRA layer only, and this run has "
                        f"{' and '.join(peft)}; set quantization.compute=bf16")
    return problems


def config_problems(cfg: RunConfig) -> list[str]:
    """Every rule between keys that the config alone decides, one line each naming the keys;
    load_config refuses a config with any."""
    problems = data_problems(cfg.data)
    if cfg.train.activation_offload is True and cfg.train.gradient_checkpointing is False:
        problems.append("train.activation_offload=true moves the inputs of recomputing layers to the host, and "
                        "train.gradient_checkpointing=false recomputes none; set gradient_checkpointing to true, "
                        "auto or a fraction, or activation_offload to auto or false")
    if cfg.train.tiled_mlp is True and cfg.train.gradient_checkpointing is False:
        problems.append("train.tiled_mlp=true tiles the MLPs of recomputing layers, and "
                        "train.gradient_checkpointing=false recomputes none; set gradient_checkpointing to true, "
                        "auto or a fraction, or tiled_mlp to auto or false")
    if cfg.train.tiled_mlp is True and cfg.train.strategy in ZERO3_STRATEGIES:
        problems.append(f"train.tiled_mlp=true cannot run with train.strategy={cfg.train.strategy} (DeepSpeed "
                        "gathers each layer's weights around its forward, not the tiles' own); set "
                        "train.tiled_mlp to auto or false, or another strategy")
    if cfg.data.streaming and cfg.train.max_steps <= 0:
        problems.append("data.streaming needs train.max_steps: a stream has no length to count epochs by")
    if cfg.train.strategy in ZERO3_STRATEGIES:
        # ZeRO-3 loads the base block by block into partitions (model/zero3.py): DoRA's magnitudes
        # start from the norms of whole weights and modules_to_save copies whole modules.
        asked = [k for k, on in (("lora.dora", cfg.lora.dora), ("lora.modules_to_save", cfg.lora.modules_to_save))
                 if on]
        if asked:
            problems.append(f"{' and '.join(asked)} cannot run with train.strategy={cfg.train.strategy} (each "
                            "rank holds a slice of the base weights); use train.strategy=ddp or single, or turn "
                            "them off")
    return problems + _fp8_problems(cfg) + _preference_problems(cfg)


def _preference_problems(cfg: RunConfig) -> list[str]:
    """What preference tuning cannot run with. DPO's reference log-probs are computed once, by the
    policy before its first step (docs/preference.md): NEFTune's noise on the training forwards
    would make the policy differ from that reference at step 0, so its margins start off zero."""
    method, pref = cfg.train.method, cfg.preference
    problems = []
    if method != "dpo" and pref.loss != "sigmoid":
        problems.append(f"preference.loss={pref.loss} is a DPO loss and train.method is {method}; set "
                        "train.method=dpo or leave preference.loss at sigmoid")
    if pref.label_smoothing and (method != "dpo" or pref.loss != "sigmoid"):
        problems.append(f"preference.label_smoothing applies to DPO's sigmoid loss only (train.method={method}, "
                        f"preference.loss={pref.loss}); set it to 0")
    if method in PREFERENCE_METHODS and cfg.train.neftune_alpha is not None:
        problems.append(f"train.neftune_alpha cannot run with train.method={method}: the noise changes the "
                        "policy's log-probs of the very pairs it compares (and DPO's reference is the noiseless "
                        "policy before training); set train.neftune_alpha=null")
    if method in PREFERENCE_METHODS and cfg.data.streaming:
        problems.append(f"train.method={method} reads preference pairs from tables, not streams; set "
                        "data.streaming=false")
    return problems


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


def _models_in(annotation) -> list[type[BaseModel]]:
    """The sections an annotation holds: the model itself, or those inside a list or a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _keys_at(loc: tuple) -> list[str]:
    """The key names valid where an error's location ends: the fields of the section that holds
    its last part (a source of data.train for `data.train.0.wieght`, not the top level)."""
    section: type[BaseModel] | None = RunConfig
    for part in loc[:-1]:
        if section is not None and isinstance(part, str) and part in section.model_fields:
            inner = _models_in(section.model_fields[part].annotation)
            section = inner[0] if inner else None
        # a list index or a union branch's tag ('list[DataSource]') stays in the same section
    return list(section.model_fields) if section is not None else []


def _describe(err: dict) -> str:
    if not err["loc"]:  # a rule between keys (config_problems): its lines name the keys
        return err["msg"].removeprefix("Value error, ")
    key = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("literal[", "int", "bool", "list")))
    kind = err["type"]
    ctx = err.get("ctx") or {}
    got = err.get("input")
    if kind == "extra_forbidden":
        # the closest key among those valid at this position, as the whole dotted key, else by its last part
        section, _, leaf = key.rpartition(".")
        names = _keys_at(err["loc"])
        peers = [f"{section}.{n}" if section else n for n in names]
        hint = difflib.get_close_matches(key, peers, n=1, cutoff=0.6)
        if not hint:
            leaves = difflib.get_close_matches(leaf, names, n=1, cutoff=0.5)
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


def _override_of(loc: tuple, overrides: list[str]) -> str | None:
    """The `--set` item that put the value at an error's location there (the last one that set
    it or a section above it), or None when the value came from the file. A rule between keys has
    no location: its line names the keys, and it is blamed on the file."""
    if not loc:
        return None
    parts = [str(p) for p in loc if isinstance(p, str) and not p.startswith(("literal[", "list["))]
    found = None
    for item in overrides:
        path, _ = parse_override(item)
        if parts[:len(path)] == path or path[:len(parts)] == parts:
            found = item
    return found


def validate_config(raw: dict, source: str = "config", overrides: list[str] | None = None) -> RunConfig:
    """`raw` (the file's mapping with `overrides` applied) as a RunConfig; each problem is named
    against where its value came from: `source` (the file) or the `--set KEY=VALUE` that set it."""
    if not isinstance(raw, dict):
        raise UserError(f"{source}: the top level must be a mapping of sections (model:, data:, train:, ...)")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        # Union types report one error per branch; keep the first per key so the line stays short.
        seen, by_origin = set(), {}
        for err in exc.errors():
            if err["loc"] and err["loc"][-1] == "str" and isinstance(err.get("input"), list):
                continue  # a list of sources: the plain-path branch of the union says nothing useful
            text = _describe(err)
            key = text.split(":")[0]
            if key not in seen:
                seen.add(key)
                item = _override_of(err["loc"], overrides or [])
                by_origin.setdefault(source if item is None else f"--set {item}", []).append(text)
        raise UserError("; ".join(f"{origin}: " + "; ".join(texts) for origin, texts in by_origin.items())) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (or start from the defaults when path is None), apply overrides, validate."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        p = Path(path)
        if p.is_dir():
            raise UserError(f"{path}: is a directory; give a config YAML file (for example configs/tiny.yaml)")
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
    return validate_config(raw, source, overrides)
