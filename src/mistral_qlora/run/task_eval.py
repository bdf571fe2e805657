"""Benchmark scores of a model in memory through lm-evaluation-harness, before and after its adapter.

The model is wrapped in lm-eval's own `HFLM` (it accepts a loaded model), so batching, padding,
log-likelihoods and generation are lm-eval's; only two things are added by subclassing it:

- the count of requests and the time spent answering them (requests/s in the table);
- the chat template: a checkpoint's own Jinja template is lm-eval's `apply_chat_template`; the
  Mistral templates (which the tokenizer may not carry) render the turns through data/templates.py,
  the same ids the run trained on, handed to lm-eval as text (special tokens kept).

`before_after` scores once with the adapter switched off (PEFT's `disable_adapter()`), once on,
on the same loaded model. The tasks are checked (`prepare_tasks`) before any model loads: an
unknown task, a missing include path, a hub task whose data is neither cached nor reachable, each
one line. Task data is loaded at that check and again by `simple_evaluate` (a local file or the
`datasets` cache: quick).
"""

from __future__ import annotations

import difflib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from mistral_qlora.errors import UserError

INSTALL = "pip install 'mistral-qlora[eval]'"
# dataset_path values that read local files (with data_files) rather than a hub dataset
LOCAL_LOADERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}


@dataclass
class TaskSpec:
    """Which tasks and how: the `evaluate` flags and the run's eval.* keys map onto this."""

    tasks: list[str]
    limit: int | None = None
    num_fewshot: int | None = None
    include_path: str | list[str] | None = None  # a folder of task YAMLs, or several
    chat_template: bool = True
    batch_size: int | str = 1
    where: dict = field(default_factory=lambda: {"tasks": "--tasks", "limit": "--limit",
                                                 "include_path": "--include-path"})


def _lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise UserError(f"lm-evaluation-harness is not installed: {INSTALL} (or pip install 'lm-eval>=0.4')") from None
    return lm_eval


def prepare_tasks(spec: TaskSpec):
    """lm-eval's TaskManager for the spec's tasks, every task's data loaded once as a check; one line
    (UserError) for what would fail later. Built-in tasks are indexed only when a task is not in
    the include path (indexing them all takes seconds)."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    w = spec.where
    if not spec.tasks:
        raise UserError(f"{w['tasks']}: name at least one task")
    if spec.limit is not None and spec.limit < 1:
        raise UserError(f"{w['limit']}={spec.limit}: must be at least 1 (leave it out for every example)")
    folders = [spec.include_path] if isinstance(spec.include_path, str) else list(spec.include_path or [])
    for folder in folders:
        if not Path(folder).is_dir():
            raise UserError(f"{w['include_path']} {folder}: no such folder (a folder of lm-eval task YAMLs)")
    manager = TaskManager(include_path=folders, include_defaults=False) if folders else None
    if manager is None or any(t not in manager.all_tasks for t in spec.tasks):
        manager = TaskManager(include_path=folders or None)
    for name in spec.tasks:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (closest: {', '.join(close)})" if close else ""
            where = f" or in {', '.join(folders)}" if folders else ""
            raise UserError(f"{w['tasks']}: unknown task {name!r}{hint}; not among lm-eval's tasks{where}")
        _check_task_data(manager, name, spec)
    return manager


def _check_task_data(manager, name: str, spec: TaskSpec) -> None:
    entry = manager.task_index[name]
    cfg = entry.cfg or {}
    source = cfg.get("dataset_path")
    try:
        manager.load([name])
    except Exception as exc:  # datasets raises many kinds for an unreachable hub or a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if source and source not in LOCAL_LOADERS and not Path(str(source)).exists():
            raise UserError(
                f"task {name!r}: its data, hub dataset {source!r}, is neither cached nor reachable ({reason}); "
                f"make it local: run once with network so `datasets` caches it, or copy the data to JSON and point "
                f"a task YAML at it (dataset_path: json, dataset_kwargs.data_files) in {spec.where['include_path']} "
                "DIR (docs/evaluate.md)") from None
        raise UserError(f"task {name!r}: cannot load its data ({cfg.get('task', name)} from "
                        f"{entry.yaml_path}): {reason}") from None


def _lm_class():
    """HFLM with request counting and the run's chat template (lm_eval imported on first use)."""
    from lm_eval.models.huggingface import HFLM

    class RunLM(HFLM):
        def __init__(self, *args, template=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.template = template  # a data/templates.py ChatTemplate, or None: the tokenizer's own
            self.requests = 0
            self.seconds = 0.0

        def _timed(self, method, requests, disable_tqdm):
            started = time.perf_counter()
            out = method(requests, disable_tqdm=disable_tqdm)
            self.seconds += time.perf_counter() - started
            self.requests += len(requests)
            return out

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return self._timed(super().loglikelihood, requests, disable_tqdm)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return self._timed(super().loglikelihood_rolling, requests, disable_tqdm)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return self._timed(super().generate_until, requests, disable_tqdm)

        def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
            if self.template is None or self.template.name == "tokenizer":
                return super().apply_chat_template(chat_history, add_generation_prompt)
            return render_chat(self.template, self.tokenizer, chat_history)

    return RunLM


def render_chat(template, tokenizer, chat_history: list[dict]) -> str:
    """lm-eval's chat history (system, user/assistant turns; a last assistant message is a prefix
    to continue) as the text of the ids `template` gives the model to answer the last user turn."""
    from mistral_qlora.data.formats import Conversation

    system = "\n".join(m["content"] for m in chat_history if m["role"] == "system")
    turns, prompt, prefix = [], None, ""
    for m in (m for m in chat_history if m["role"] != "system"):
        if m["role"] == "user":
            if prompt is not None:
                turns.append((prompt, ""))
            prompt = m["content"]
        elif prompt is not None:
            turns.append((prompt, m["content"]))
            prompt = None
    if prompt is None:  # the history ends with an assistant message: continue it
        prompt, prefix = turns.pop() if turns else ("", "")
    turns.append((prompt, ""))
    ids = template.generation_ids(Conversation(turns, system))
    return tokenizer.decode(ids, skip_special_tokens=False) + prefix


def score(lm, spec: TaskSpec, manager) -> dict:
    """lm-eval's results for the spec's tasks, with requests and seconds of this pass added."""
    from lm_eval import simple_evaluate

    lm.requests, lm.seconds = 0, 0.0
    results = simple_evaluate(model=lm, tasks=list(spec.tasks), num_fewshot=spec.num_fewshot, limit=spec.limit,
                              task_manager=manager, apply_chat_template=spec.chat_template, log_samples=False,
                              batch_size=spec.batch_size)
    return {"results": results["results"], "n-samples": results.get("n-samples", {}),
            "higher_is_better": results.get("higher_is_better", {}),
            "speed": {"requests": lm.requests, "seconds": round(lm.seconds, 3),
                      "requests_per_second": lm.requests / lm.seconds if lm.seconds else None}}


def wrap(model, tokenizer, spec: TaskSpec, template=None):
    """Our loaded model in lm-eval's HFLM (a PeftModel or a plain one)."""
    return _lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=spec.batch_size,
                       template=template if spec.chat_template else None)


def before_after(model, tokenizer, spec: TaskSpec, manager, template=None, adapter: bool = True) -> dict:
    """The table: each task and metric before (adapter off) and after (on), with lm-eval's
    standard errors and the difference; `adapter=False` (a model alone): one column, `score`."""
    lm = wrap(model, tokenizer, spec, template)
    was_training = model.training
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = True  # generation tasks; training configs switch it off
    try:
        passes = {}
        if adapter:
            with model.disable_adapter():
                passes["before"] = score(lm, spec, manager)
            passes["after"] = score(lm, spec, manager)
        else:
            passes["score"] = score(lm, spec, manager)
    finally:
        model.config.use_cache = use_cache
        model.train(was_training)
    chat = None
    if spec.chat_template:
        chat = template.describe() if template is not None else "the tokenizer's (lm-eval's apply_chat_template)"
    return build_table(passes, spec, chat)


def _metrics(task_results: dict) -> list[tuple[str, str, float, float | None]]:
    """(metric, filter, value, stderr) from one task's lm-eval results."""
    out = []
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        if not filt or metric.endswith("_stderr") or not isinstance(value, (int, float)):
            continue
        stderr = task_results.get(f"{metric}_stderr,{filt}")
        out.append((metric, filt, float(value), float(stderr) if isinstance(stderr, (int, float)) else None))
    return out


def build_table(passes: dict, spec: TaskSpec, chat: str | None) -> dict:
    """One row per task, metric and filter; columns are the passes (before/after, or score)."""
    columns = list(passes)
    first = passes[columns[0]]
    rows = []
    for task in spec.tasks:
        for metric, filt, _, _ in _metrics(first["results"].get(task, {})):
            row = {"task": task, "metric": metric, "filter": filt,
                   "n": first["n-samples"].get(task, {}).get("effective"),
                   "higher_is_better": first["higher_is_better"].get(task, {}).get(metric)}
            for col in columns:
                values = {m: (v, s) for m, f, v, s in _metrics(passes[col]["results"].get(task, {})) if f == filt}
                row[col], row[f"{col}_stderr"] = values.get(metric, (None, None))
            if columns == ["before", "after"] and row["before"] is not None and row["after"] is not None:
                row["diff"] = row["after"] - row["before"]
            rows.append(row)
    return {"tasks": list(spec.tasks), "limit": spec.limit, "num_fewshot": spec.num_fewshot,
            "chat_template": chat, "columns": columns, "rows": rows,
            "speed": {col: passes[col]["speed"] for col in columns}}


def _fmt(v, stderr=None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def table_markdown(table: dict) -> str:
    """The table as Markdown, with how it was scored and the speed of each pass."""
    cols = table["columns"]
    head = ["task", "metric", "n"] + cols + (["diff"] if "before" in cols else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        cells = [r["task"], metric, str(r["n"] if r["n"] is not None else "")]
        cells += [_fmt(r[c], r[f"{c}_stderr"]) for c in cols]
        if "before" in cols:
            cells.append("n/a" if r.get("diff") is None else f"{r['diff']:+.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    chat = table["chat_template"] or "none (plain text)"
    shots = "the tasks' own" if table["num_fewshot"] is None else table["num_fewshot"]
    limit = "all" if table["limit"] is None else table["limit"]
    notes = [f"chat template: {chat}; few-shot: {shots}; examples per task: {limit}; ± is lm-eval's standard error"]
    for col, s in table["speed"].items():
        rate = "n/a" if s["requests_per_second"] is None else f"{s['requests_per_second']:.2f}"
        notes.append(f"{col}: {s['requests']} requests in {s['seconds']:.1f} s ({rate} requests/s)")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def tracker_metrics(table: dict) -> dict[str, float]:
    """Flat `tasks/<task>/<metric>/<column>` scalars for the trackers."""
    out = {}
    for r in table["rows"]:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']}_{r['filter']}"
        for col in table["columns"] + (["diff"] if "diff" in r else []):
            if r.get(col) is not None:
                out[f"tasks/{r['task']}/{metric}/{col}"] = r[col]
    return out


def write_table(table: dict, folder: Path) -> tuple[Path, Path]:
    """results.json and results.md in `folder`, each written whole."""
    from mistral_qlora.files import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    js, md = folder / "results.json", folder / "results.md"
    atomic_write_text(js, json.dumps(table, indent=2) + "\n")
    atomic_write_text(md, table_markdown(table))
    return js, md

