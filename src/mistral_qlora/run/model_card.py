"""The model card: `README.md` in the hub's form, for a run's adapter and for a merged model.

YAML front matter (what the hub indexes: base_model, library_name, license, tags, datasets),
then how the model was trained (the run's resolved config and what summary.json reports), its
eval loss before and after, benchmark scores when the summary holds them, and how to load it.
Everything comes from the run folder's files (`config.yaml`, `summary.json`) and the adapter's
`adapter_config.json`, so `train` (with the summary in hand) and `merge` (reading the run folder
later) write the same card. Only hub ids go into `base_model` and `datasets`: the hub refuses
anything else there, and a local path means nothing to a reader elsewhere.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from mistral_qlora.files import atomic_write_text

CARD = "README.md"
# Keys of summary.json that may hold benchmark scores (rendered whatever their shape).
BENCHMARK_KEYS = ("benchmarks", "eval_tasks", "tasks")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str | None) -> bool:
    """`org/name`, not a path that exists here nor a GGUF file."""
    return bool(name) and _HUB_ID.fullmatch(name) is not None and not Path(name).exists() \
        and not name.endswith(".gguf")


def front_matter(card: str) -> dict:
    """The YAML front matter of a card's text (`---` ... `---` at its start); {} without one."""
    m = re.match(r"---\n(.*?)\n---\n", card, re.S)
    if not m:
        return {}
    data = yaml.safe_load(m[1])
    return data if isinstance(data, dict) else {}


def base_license(base_path: str | None, revision: str | None = None) -> str | None:
    """The base's license as its own README front matter (or config.json) says: a local folder's
    files, or a hub id's from the local hub cache (nothing is downloaded); None when not known."""
    if not base_path:
        return None
    folder = Path(base_path)
    readme = folder / CARD if folder.is_dir() else None
    config = folder / "config.json" if folder.is_dir() else None
    if readme is None and is_hub_id(base_path):
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(base_path, CARD, revision=revision)
            readme = Path(found) if isinstance(found, str) else None
        except Exception:  # noqa: BLE001 - a card is written without a license rather than not at all
            readme = None
    if readme is not None and readme.is_file():
        license_ = front_matter(readme.read_text(errors="replace")).get("license")
        if isinstance(license_, str) and license_:
            return license_
    if config is not None and config.is_file():
        license_ = json.loads(config.read_text()).get("license")
        if isinstance(license_, str) and license_:
            return license_
    return None


def _get(d: dict | None, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def _sources(config: dict | None, summary: dict | None) -> list[dict]:
    """The training sources with their shares: as summary.json reports them, else as config.yaml
    lists them (weights only)."""
    if summary and summary.get("sources"):
        return summary["sources"]
    train = _get(config, "data.train")
    if train is None:
        return []
    specs = [{"path": train}] if isinstance(train, str) else train
    total = sum(float(s.get("weight", 1.0)) for s in specs) or 1.0
    return [{"name": s["path"], "weight": float(s.get("weight", 1.0)) / total, "hub": is_hub_id(s["path"])}
            for s in specs]


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    cell = lambda v: _fmt(v).replace("|", "\\|")  # noqa: E731
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)]


def _benchmarks(summary: dict | None) -> list[str]:
    """A table of whatever benchmark scores the summary holds: {task: score or {metric: score}}
    or [{task..., metric: score}], under the first key of BENCHMARK_KEYS present."""
    key = next((k for k in BENCHMARK_KEYS if summary and summary.get(k)), None)
    if key is None:
        return []
    scores = summary[key]
    if isinstance(scores, dict):
        if all(isinstance(v, dict) for v in scores.values()):
            metrics = list(dict.fromkeys(m for v in scores.values() for m in v))
            rows = [[task, *(v.get(m) for m in metrics)] for task, v in scores.items()]
            return _table(["task", *metrics], rows)
        return _table(["task", "score"], [[task, v] for task, v in scores.items()])
    if isinstance(scores, list) and all(isinstance(r, dict) for r in scores):
        columns = list(dict.fromkeys(c for r in scores for c in r))
        return _table(columns, [[r.get(c) for c in columns] for r in scores])
    return [f"`{key}`: {_fmt(scores)}"]


def model_card(kind: str, base_name: str, adapter_config: dict | None, config: dict | None = None,
               summary: dict | None = None, license_: str | None = None, title: str | None = None) -> str:
    """The card's text. kind: "adapter" (library peft) or "merged" (library transformers)."""
    template = (summary or {}).get("template") or _get(config, "data.template")
    bits = _get(config, "quantization.bits")
    sources = _sources(config, summary)
    meta: dict = {}
    if is_hub_id(base_name):
        meta["base_model"] = base_name
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    if license_:
        meta["license"] = license_
    tags = ["mistral-qlora", "qlora" if bits != 16 else "lora", "lora"]
    if template:
        tags.append(f"template-{template}" if template == "tokenizer" else template)
    if kind == "merged":
        tags.append("merged")
    meta["tags"] = list(dict.fromkeys(tags))
    datasets = [s["name"] for s in sources if s.get("hub")]
    if datasets:
        meta["datasets"] = datasets
    meta["pipeline_tag"] = "text-generation"

    what = ("A LoRA adapter for" if kind == "adapter" else "A LoRA adapter merged into a 16-bit copy of")
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {title or ('adapter' if kind == 'adapter' else 'merged model')}", "",
             f"{what} `{base_name}`, fine-tuned with "
             f"mistral-qlora ({'4-bit QLoRA' if bits != 16 else '16-bit LoRA'}).", ""]
    lines += _training(base_name, adapter_config, config, summary, template, sources)
    lines += _evaluation(summary)
    lines += _usage(kind, base_name)
    return "\n".join(lines) + "\n"


def _training(base_name, adapter_config, config, summary, template, sources) -> list[str]:
    ac = adapter_config or {}
    r = _get(config, "lora.r", ac.get("r"))
    alpha = _get(config, "lora.alpha", ac.get("lora_alpha"))
    targets = _get(config, "lora.target_modules", ac.get("target_modules"))
    if isinstance(targets, (list, tuple, set)):
        targets = sorted(targets)
    variants = (summary or {}).get("lora_variants")
    if variants is None and ac:
        variants = [n for n, on in (("rsLoRA", ac.get("use_rslora")), ("DoRA", ac.get("use_dora"))) if on]
    bits = _get(config, "quantization.bits")
    quant = None
    if bits == 16:
        quant = "none (16-bit base: plain LoRA)"
    elif bits is not None:
        quant = (f"4-bit {_get(config, 'quantization.quant_type', 'nf4')}"
                 + (", double quantization" if _get(config, "quantization.double_quant") else "")
                 + f", {_get(config, 'quantization.compute', 'bf16')} compute")
    s = summary or {}
    rows = [["base model", f"`{base_name}`"],
            ["LoRA", f"r={_fmt(r)}, alpha={_fmt(alpha)}, dropout={_fmt(_get(config, 'lora.dropout', ac.get('lora_dropout')))}"],
            ["LoRA targets", _fmt(targets)],
            ["LoRA variants", _fmt(variants) if variants is not None else None],
            ["quantization", quant],
            ["chat template", template],
            ["max_seq_len / tokens_per_row",
             f"{_fmt(_get(config, 'data.max_seq_len'))} / {_fmt(_get(config, 'data.tokens_per_row'))}"
             + (" (packed)" if _get(config, "data.packing") else "") if config else None],
            ["learning rate", f"{_fmt(_get(config, 'train.learning_rate'))} ({_get(config, 'train.lr_scheduler')}, "
                              f"warmup {_fmt(_get(config, 'train.warmup_ratio'))})" if config else None],
            ["batch", f"{_get(config, 'train.micro_batch_size')} x {_get(config, 'train.grad_accum')} accumulated"
                      f" x {s.get('world_size', 1)} processes" if config else None],
            ["steps", s.get("steps")],
            ["epochs", s.get("epochs")],
            ["training tokens", s.get("train_tokens")],
            ["seed", _get(config, "train.seed")]]
    out = ["## Training", "", *_table(["setting", "value"], [row for row in rows if row[1] is not None]), ""]
    if sources:
        out += ["### Data", ""]
        if summary and summary.get("sources"):
            mix = _get(config, "data.mix")
            out += ["Sources and their shares as the run reported them"
                    + (f" (data.mix={mix})" if mix else "") + ":", ""]
            out += _table(["source", "weight", "records kept", "draws", "share of the mix"],
                          [[f"`{x['name']}`", f"{x['weight']:.1%}", x.get("kept"), x.get("drawn"),
                            f"{x['share']:.1%}" if x.get("share") is not None else None] for x in sources])
        else:
            out += _table(["source", "weight"], [[f"`{x['name']}`", f"{x['weight']:.1%}"] for x in sources])
        out.append("")
    return out


def _evaluation(summary: dict | None) -> list[str]:
    s = summary or {}
    out = []
    if s.get("initial_eval_loss") is not None or s.get("final_eval_loss") is not None:
        out += ["## Evaluation", "", "Mean loss over every answer token of the held-out set:", "",
                *_table(["", "before training", "after training"],
                        [["eval loss", s.get("initial_eval_loss"), s.get("final_eval_loss")],
                         ["eval perplexity", s.get("initial_eval_perplexity"), s.get("final_eval_perplexity")]]), ""]
    bench = _benchmarks(summary)
    if bench:
        out += ["## Benchmarks", "", *bench, ""]
    return out


def _usage(kind: str, base_name: str) -> list[str]:
    if kind == "adapter":
        load = ["```python", "from peft import PeftModel",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base_name}", dtype="auto")',
                'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```", "",
                "With mistral-qlora (the base as the run named it, a built-in or GGUF base included):", "",
                "```bash", 'mistral-qlora generate --adapter THIS_FOLDER --prompt "..."',
                "mistral-qlora merge --adapter THIS_FOLDER --output MERGED       # a 16-bit transformers model",
                "mistral-qlora export --adapter THIS_FOLDER --output MODEL.gguf  # llama.cpp, Ollama (f16; --type q8_0)",
                "mistral-qlora export --adapter THIS_FOLDER --output ADAPTER.gguf --format gguf-lora --base-gguf BASE.gguf",
                "ollama create NAME -f MODEL.Modelfile && ollama run NAME", "```"]
    else:
        load = ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER", dtype="auto")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```", "",
                "For llama.cpp and Ollama, export the adapter it was merged from:", "",
                "```bash", "mistral-qlora export --adapter RUN/adapter --output MODEL.gguf  # f16; --type q8_0",
                "mistral-qlora export --adapter RUN/adapter --output ADAPTER.gguf --format gguf-lora --base-gguf BASE.gguf",
                "ollama create NAME -f MODEL.Modelfile && ollama run NAME", "```"]
    return ["## How to use it", "", *load]


def run_folder_files(adapter_dir: Path) -> tuple[dict | None, dict | None]:
    """(config.yaml, summary.json) of the run folder an adapter sits in (`RUN/adapter`); None for
    each file that is not there."""
    run = Path(adapter_dir).resolve().parent
    config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    return (config if isinstance(config, dict) else None), (summary if isinstance(summary, dict) else None)


def write_model_card(folder: Path, kind: str, adapter_dir: Path, base_name: str, base_path: str | None,
                     config: dict | None = None, summary: dict | None = None) -> Path:
    """Write `folder/README.md` (whole, replacing PEFT's stub), from `config` and `summary` when
    given, else from the adapter's run folder."""
    if config is None and summary is None:
        config, summary = run_folder_files(adapter_dir)
    path = Path(adapter_dir) / "adapter_config.json"
    adapter_config = json.loads(path.read_text()) if path.is_file() else None
    title = (_get(config, "train.run_name") or Path(_get(config, "output_dir") or "").name or None)
    text = model_card(kind, base_name, adapter_config, config, summary,
                      base_license(base_path, _get(config, "model.revision")), title)
    atomic_write_text(Path(folder) / CARD, text)
    return Path(folder) / CARD
