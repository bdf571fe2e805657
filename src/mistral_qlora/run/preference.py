"""Preference tuning on the run's own engine: DPO (sigmoid, IPO, conservative label smoothing) and
ORPO over packed rows of whole pairs (data/collator.py `PackedPairs`: record 2k of a batch is a
pair's chosen answer, record 2k+1 its rejected one).

- Log-probs (`record_logps`): each record's summed log-prob of its labelled tokens. The model's
  head runs only on the positions whose next token is labelled (`logits_to_keep`), and the
  float32 log-softmax goes chunk by chunk (`TokenLogps`: forward keeps one log-sum-exp a token,
  backward writes the logits' gradient chunk by chunk), so no float32 (tokens x vocabulary)
  tensor of the whole row ever exists. Tokens are assigned to
  records by `position_ids` restarting at 0, and summed with one `index_add`: packed and unpacked
  rows give the same numbers.
- Losses (`dpo_loss`, `orpo_loss`): TRL's definitions (DPOTrainer's sigmoid with label smoothing
  and its length-averaged IPO; ORPOTrainer's odds-ratio loss on average log-probs).
- The reference (`ReferenceLogps`): before the first step the policy *is* DPO's reference (PEFT
  starts B at 0, so the adapter is the identity; with `lora.init_from` it is that adapter). One
  no-grad, eval-mode pass over the train and eval pairs therefore gives every record's reference
  log-prob, with no second model and no extra forward per step. The arrays (pairs x [chosen,
  rejected], float64) are cached in the data cache under a key of everything they depend on, so a
  resumed run reads the very numbers it started with.
- `PreferenceTrainer`: RunTrainer with the preference loss, its metrics stored per micro-step and
  averaged into each log line as TRL does, and an evaluation summed over the whole eval set.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.errors import UserError
from mistral_qlora.files import atomic_write_bytes
from mistral_qlora.plan.memory import LOGSOFTMAX_CHUNK
from mistral_qlora.run.trainer import RunTrainer
from mistral_qlora.runtime import barrier, log

# Batch keys that are the loss's, not the model's.
LOSS_KEYS = ("labels", "record_pair", "reference_logps")


# ---------------------------------------------------------------------------------------------
# Log-probs


class TokenLogps(torch.autograd.Function):
    """log softmax(logits)[target] per row of `logits` (K, V), in float32, `chunk` rows at a time.

    Forward keeps each row's log-sum-exp (K floats) and nothing of the float32 log-softmax. Backward
    writes d logits = g * (onehot(target) - softmax(logits)) chunk by chunk into one gradient
    tensor in the logits' dtype, recomputing each chunk's softmax from the kept log-sum-exp: no
    float32 (K x V) tensor and no zero-filled per-chunk gradient ever exists."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(out)
        for s in range(0, logits.shape[0], chunk):
            x = logits[s:s + chunk].float()
            lse[s:s + chunk] = torch.logsumexp(x, -1)
            out[s:s + chunk] = x.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
        ctx.save_for_backward(logits, targets, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            g = grad_out[s:s + ctx.chunk, None]
            d = (logits[s:s + ctx.chunk].float() - lse[s:s + ctx.chunk, None]).exp_().mul_(-g)
            d.scatter_add_(1, targets[s:s + ctx.chunk, None], g)
            grad[s:s + ctx.chunk] = d
        return grad, None, None


def token_logps(logits: torch.Tensor, targets: torch.Tensor, chunk: int = LOGSOFTMAX_CHUNK) -> torch.Tensor:
    """log softmax(logits)[target] per row of `logits` (K, V), in float32 (`TokenLogps`)."""
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    return TokenLogps.apply(logits, targets, chunk)


def record_logps(model, batch: dict, n_records: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of each record's labelled tokens (n_records,) float32, labelled tokens per
    record (n_records,)) for a packed (1, T) batch. Labels are aligned to input_ids, so the logit
    at position t scores the label at t + 1 (transformers' shift); a record's first label is
    always -100, so no token is scored across a record boundary. The model is called without
    labels (no label loss, no fused cross-entropy) and with the head kept to the scored positions."""
    labels = batch["labels"][0]
    positions = batch["position_ids"][0]
    record = torch.cumsum(positions == 0, 0) - 1  # record index of every token
    if n_records is None:
        n_records = int(record[-1]) + 1
    scored = (labels[1:] != IGNORE_INDEX).nonzero().squeeze(1)  # logit positions t whose label t+1 counts
    inputs = {k: v for k, v in batch.items() if k not in LOSS_KEYS}
    out = model(**inputs, logits_to_keep=scored, use_cache=False)
    logits = out.logits
    logits = logits.reshape(-1, logits.shape[-1])  # (K, V): the kept positions in order
    per_token = token_logps(logits, labels[scored + 1])
    owner = record[scored + 1]
    sums = torch.zeros(n_records, dtype=torch.float32, device=per_token.device).index_add(0, owner, per_token)
    counts = torch.zeros(n_records, dtype=torch.float32, device=per_token.device).index_add(
        0, owner, torch.ones_like(per_token))
    return sums, counts


def as_pairs(x: torch.Tensor) -> torch.Tensor:
    """(2n,) in record order (chosen, rejected, chosen, ...) -> (n, 2)."""
    return x.view(-1, 2)


# ---------------------------------------------------------------------------------------------
# Losses (TRL's definitions)


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, tokens: torch.Tensor, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0):
    """Per-pair DPO losses and rewards from summed log-probs, each (n_pairs, 2) = [chosen, rejected].

    sigmoid: with h = (log pi(c) - log ref(c)) - (log pi(r) - log ref(r)),
      loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)   (eps = label_smoothing:
      conservative DPO, the pair's label taken as flipped with probability eps).
    ipo: the same log-ratios divided by each answer's labelled tokens, loss = (h_avg - 1 / (2 beta))^2.
    Rewards are beta * (log pi - log ref) of the summed log-probs, detached.
    Returns (losses (n_pairs,), chosen_rewards, rejected_rewards)."""
    ratios = policy - reference  # (n, 2)
    if loss == "sigmoid":
        h = ratios[:, 0] - ratios[:, 1]
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss == "ipo":
        avg = ratios / tokens.clamp(min=1.0)
        losses = (avg[:, 0] - avg[:, 1] - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    rewards = beta * ratios.detach()
    return losses, rewards[:, 0], rewards[:, 1]


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (expm1 near 0, log1p far from it)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy: torch.Tensor, tokens: torch.Tensor, beta: float):
    """ORPO from summed log-probs and labelled tokens, each (n_pairs, 2) = [chosen, rejected].

    With the average log-probs a = log pi / tokens, log odds(y) = a(y) - log(1 - exp(a(y))), and
    ratio = log sigmoid(log odds(c) - log odds(r)):
      loss = NLL(chosen) - beta * mean(ratio),
    NLL being the mean over every chosen labelled token of the batch.
    Rewards are beta * a, detached. Returns (loss, nll, ratio (n_pairs,), chosen_rewards,
    rejected_rewards)."""
    avg = policy / tokens.clamp(min=1.0)
    log_odds = (avg[:, 0] - avg[:, 1]) - (_log1mexp(avg[:, 0]) - _log1mexp(avg[:, 1]))
    ratio = F.logsigmoid(log_odds)
    nll = -policy[:, 0].sum() / tokens[:, 0].sum().clamp(min=1.0)
    rewards = beta * avg.detach()
    return nll - beta * ratio.mean(), nll, ratio, rewards[:, 0], rewards[:, 1]


# ---------------------------------------------------------------------------------------------
# The trainer

# Sums a batch contributes to the metrics: [pairs, per-pair loss, chosen reward, rejected reward,
# reward accuracy, policy preference (summed log-prob of chosen > rejected's), ORPO's NLL sum,
# ORPO's chosen tokens].
_N_TOTALS = 8


class PreferenceTrainer(RunTrainer):
    """RunTrainer whose loss is DPO's or ORPO's over the pairs of each packed batch.

    The loss of a micro-batch is the mean over its pairs (ORPO: plus the NLL over its chosen tokens);
    the Trainer divides it by the accumulation steps (`model_accepts_loss_kwargs` off: the count of
    label tokens it would otherwise normalize by means nothing for pairs). Training metrics (loss
    parts, rewards, margins, accuracies) are summed per micro-step on each rank's device, summed
    over the ranks when a line is logged and averaged into it; evaluation sums them over every pair of the eval set and every rank."""

    def __init__(self, *args, method: str = "dpo", beta: float = 0.1, loss_type: str = "sigmoid",
                 label_smoothing: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.beta, self.loss_type, self.label_smoothing = method, beta, loss_type, label_smoothing
        self.model_accepts_loss_kwargs = False
        self._train_totals: torch.Tensor | None = None  # this rank's sums since the last log, on its device

    def pair_loss(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(the micro-batch's loss, its metric sums `_N_TOTALS`)."""
        n_records = inputs["record_pair"].numel()
        sums, counts = record_logps(model, inputs, n_records)
        policy, tokens = as_pairs(sums), as_pairs(counts)
        n = policy.shape[0]
        totals = torch.zeros(_N_TOTALS, dtype=torch.float64, device=policy.device)
        if self.method == "dpo":
            if "reference_logps" not in inputs:
                raise RuntimeError("DPO batch without reference_logps: the reference pass has not run")
            reference = as_pairs(inputs["reference_logps"].to(policy.dtype))
            losses, chosen, rejected = dpo_loss(policy, reference, tokens, self.beta, self.loss_type,
                                                self.label_smoothing)
            loss = losses.mean()
            totals[1] = losses.detach().double().sum()
        else:
            loss, nll, ratio, chosen, rejected = orpo_loss(policy, tokens, self.beta)
            totals[1] = (-self.beta * ratio.detach().double()).sum()
            totals[6] = -policy[:, 0].detach().double().sum()
            totals[7] = tokens[:, 0].double().sum()
        totals[0] = n
        totals[2] = chosen.double().sum()
        totals[3] = rejected.double().sum()
        totals[4] = (chosen > rejected).double().sum()
        p = policy.detach()
        totals[5] = (p[:, 0] > p[:, 1]).double().sum()
        return loss, totals

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, totals = self.pair_loss(model, inputs)
        if self._eval_totals is not None:
            self._eval_totals += self.accelerator.gather_for_metrics(totals[None]).sum(0).to(self._eval_totals)
        else:
            # summed on the device, gathered over ranks only when a line is logged: no sync a micro-step
            done = totals.detach()
            self._train_totals = done if self._train_totals is None else self._train_totals + done
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_totals = torch.zeros(_N_TOTALS, dtype=torch.float64, device=self.args.device)
        try:
            output = super(RunTrainer, self).evaluation_loop(dataloader, description, True, ignore_keys,
                                                             metric_key_prefix)
            totals = self._eval_totals.tolist()
        finally:
            self._eval_totals = None
        output.metrics.update({f"{metric_key_prefix}_{k}": v for k, v in self.metrics_from(totals).items()})
        return output

    def metrics_from(self, totals: list[float]) -> dict:
        """The metrics of summed totals: loss, rewards/chosen, rewards/rejected, rewards/margins,
        rewards/accuracies, preference_accuracy (share of pairs whose chosen answer has the higher
        summed log-prob), ORPO's nll_loss."""
        pairs = totals[0]
        if pairs == 0:
            return {}
        out = {"loss": totals[1] / pairs,
               "rewards/chosen": totals[2] / pairs, "rewards/rejected": totals[3] / pairs,
               "rewards/margins": (totals[2] - totals[3]) / pairs, "rewards/accuracies": totals[4] / pairs,
               "preference_accuracy": totals[5] / pairs}
        if self.method == "orpo":
            out["nll_loss"] = totals[6] / max(totals[7], 1.0)
            out["loss"] += out["nll_loss"]
        return out

    def log(self, logs: dict, start_time=None) -> None:
        if "loss" in logs:  # a training log line (every rank logs it): the steps since the last
            mine = self._train_totals
            if mine is None:
                mine = torch.zeros(_N_TOTALS, dtype=torch.float64, device=self.args.device)
            totals = self.accelerator.gather(mine[None]).sum(0).tolist()
            self._train_totals = None
            if totals[0] > 0:
                metrics = self.metrics_from(totals)
                metrics.pop("loss")  # the Trainer's own running loss is the optimized one
                logs.update(metrics)
        super().log(logs, start_time)


# ---------------------------------------------------------------------------------------------
# The reference pass and its cache


def file_digest(folder: str | Path | None) -> str | None:
    """sha256 over an adapter folder's config and weights (None without a folder)."""
    if not folder:
        return None
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = Path(folder) / name
        h.update(name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def reference_key(cfg, data_digest: str, attention: str, dtype) -> str:
    """What the reference log-probs depend on: the base (name or path, revision, window, kernels),
    how it is stored and computed (bits, quant type, compute, dtype, attention), the adapter it
    starts from (its files' hash), the LoRA shape, the tokens (the data's digest) and the rows."""
    ident = {
        "model": cfg.model.model_dump(mode="json"),
        "quantization": cfg.quantization.model_dump(mode="json"),
        "lora": {k: v for k, v in cfg.lora.model_dump(mode="json").items() if k not in ("dropout", "init_from")},
        "init_from": file_digest(cfg.lora.init_from),
        "data": data_digest,
        "rows": [cfg.data.tokens_per_row, cfg.train.micro_batch_size, cfg.train.seed],
        "attention": attention,
        "dtype": str(dtype),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


class ReferenceLogps:
    """DPO's reference log-probs of one run: `path` in the data cache, computed once (`compute`),
    read when present (`load`)."""

    def __init__(self, root: Path, key: str):
        self.path = Path(root) / "reference" / f"{key}.npz"

    def exists(self) -> bool:
        return self.path.is_file()

    def load(self) -> dict[str, np.ndarray]:
        try:
            with np.load(self.path) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.path}: damaged reference log-probs ({exc}); delete the file to compute them "
                            "again (a resumed run then needs --overwrite)") from None

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write_bytes(self.path, buf.getvalue())


def reference_pass(model, dataset, collator, device, rank: int = 0, world: int = 0) -> np.ndarray:
    """Every pair's summed log-prob [chosen, rejected] under `model` as it is now (no grad, eval
    mode), float64 (len(dataset.pairs), 2). Rank r takes rows r, r + world, ...; every rank runs
    the same number of forwards (ZeRO-3 gathers each layer collectively), the short ones repeating
    a row whose results they drop; the ranks' arrays are summed so all get the whole table."""
    world = max(world, 1)
    n_pairs = len(dataset.pairs)
    out = torch.zeros(n_pairs, 2, dtype=torch.float64, device=device)
    mine = list(range(rank, len(dataset), world))
    forwards = -(-len(dataset) // world)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k in range(forwards):
                row = mine[k] if k < len(mine) else (mine[-1] if mine else 0)
                batch = collator([dataset[row]])
                pair_ids = batch["record_pair"].view(-1, 2)[:, 0].to(device)
                batch = {k2: (v.to(device) if isinstance(v, torch.Tensor) else v) for k2, v in batch.items()}
                sums, _ = record_logps(model, batch, batch["record_pair"].numel())
                if k < len(mine):
                    out[pair_ids] = as_pairs(sums).double()
    finally:
        model.train(was_training)
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(out)
    return out.cpu().numpy()


class ReferenceCallback(TrainerCallback):
    """Gives DPO's train and eval datasets their reference log-probs when training begins (the
    engine is up, so a ZeRO-3 model can run forwards; before the evaluation at the start): read
    from the cache, or computed by the policy, which before its first step is the reference, and
    written by rank 0 while the others wait."""

    def __init__(self, store: ReferenceLogps, train_dataset, eval_dataset, collator, rank: int, world: int,
                 is_main: bool):
        self.store, self.train_dataset, self.eval_dataset = store, train_dataset, eval_dataset
        self.collator, self.rank, self.world, self.is_main = collator, rank, world, is_main
        self.arrays: dict[str, np.ndarray] | None = None
        self.computed = False

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.arrays is None:
            if self.store.exists():
                log(f"DPO reference log-probs: read from {self.store.path}")
            else:
                if state.global_step > 0:
                    raise UserError(f"{self.store.path}: the reference log-probs this run started with are gone, "
                                    "and a resumed policy is no longer the reference; --overwrite starts again")
                log("DPO reference log-probs: one pass over the train and eval pairs (the policy before training)")
                arrays = {"train": reference_pass(model, self.train_dataset, self.collator, args.device,
                                                  self.rank, self.world)}
                if self.eval_dataset is not None:
                    arrays["eval"] = reference_pass(model, self.eval_dataset, self.collator, args.device,
                                                    self.rank, self.world)
                if self.is_main:
                    self.store.save(arrays)
                    log(f"DPO reference log-probs: written to {self.store.path}")
                self.computed = True
                barrier()
            self.arrays = self.store.load()
        self.train_dataset.reference = self.arrays["train"]
        if self.eval_dataset is not None:
            self.eval_dataset.reference = self.arrays["eval"]


def preference_accuracy(reference: np.ndarray | None) -> float | None:
    """Share of pairs whose chosen answer has the higher summed log-prob."""
    if reference is None or len(reference) == 0:
        return None
    return float(np.mean(reference[:, 0] > reference[:, 1]))
