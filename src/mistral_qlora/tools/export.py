"""`mistral-qlora export`: a trained adapter folded into its base and written for the runtimes a
model is deployed with: one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile
beside it, or safetensors shards (what `merge` writes); or the adapter alone as a llama.cpp LoRA
GGUF (`gguf-lora`) to put over a base GGUF.

The GGUF carries the vocabulary the run trained with (SentencePiece, byte-level BPE or Tekken,
tools/gguf_vocab.py) and its chat template (the run's data.template, tools/chat_format.py); the
Modelfile follows the same template and stop words.

Every check a user can fail runs before the base loads: format and type, the output path, the
base, the tokenizer, and the free disk space for the file as estimated from the tensor shapes and
the type. The GGUF is written under a temporary name in the output's folder and renamed when whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mistral_qlora.errors import UserError
from mistral_qlora.files import atomic_write_text
from mistral_qlora.model.adapter import adapter_rope_scaling
from mistral_qlora.model.base import apply_rope_scaling
from mistral_qlora.tools import gguf_file, gguf_vocab
from mistral_qlora.tools.chat_format import ChatFormat, chat_format, modelfile_text
from mistral_qlora.tools.generate import run_template
from mistral_qlora.tools.merge import load_merged, merge_adapter, resolve_base

FORMATS = ("gguf", "gguf-lora", "safetensors")
# --type for safetensors -> merge's dtype
SAFETENSORS_TYPES = {"bf16": "bf16", "f16": "fp16", "fp32": "fp32"}
# --type for GGUF -> the dtype the base is merged in: f16 rounds once to f16; bf16 and q8_0
# start from the checkpoint's own bf16 (q8_0's step, max|block|/127, dwarfs bf16's rounding)
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16", "q8_0": "bf16"}

def modelfile_path(out: Path) -> Path:
    """`NAME.Modelfile` beside `NAME.gguf`, so several exports can share a folder."""
    return out.with_name(out.stem + ".Modelfile")


def tokenizer_file(adapter: str, base_path: str, name: str) -> Path | None:
    """`name` (tokenizer.model or tokenizer.json): the adapter's copy, else the base's (a hub id: its
    cached file, or the hub's); None when neither has one."""
    for folder in (Path(adapter), Path(base_path)):
        if (folder / name).is_file():
            return folder / name
    if not Path(base_path).exists():
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(base_path, name))
        except Exception:  # noqa: BLE001 - any hub failure means the file is not available
            return None
    return None


def read_vocab(adapter: str, base_path: str, tokenizer, rows: int) -> gguf_vocab.Vocab:
    """The GGUF vocabulary: Tekken from the tokenizer's tekken.json when it has one, else
    SentencePiece from tokenizer.model when there is one, else byte-level BPE from tokenizer.json."""
    from mistral_qlora.data.tekken import tekken_file

    tekken = tekken_file(tokenizer)
    if tekken is not None:
        # the Tekkenizer transformers' MistralCommonBackend already loaded from it, when it did
        loaded = getattr(getattr(getattr(tokenizer, "tokenizer", None), "instruct_tokenizer", None), "tokenizer", None)
        return gguf_vocab.read_tekken(tekken, rows, loaded)
    spm = tokenizer_file(adapter, base_path, "tokenizer.model")
    if spm is not None:
        return gguf_vocab.read_sentencepiece(spm, rows)
    bpe = tokenizer_file(adapter, base_path, "tokenizer.json")
    if bpe is not None:
        return gguf_vocab.read_bpe(bpe, tokenizer, rows)
    raise UserError(f"{base_path}: neither tokenizer.model (SentencePiece) nor tokenizer.json (BPE): nothing to "
                    "build the GGUF vocabulary from")


def load_export_tokenizer(adapter: str, base_path: str):
    """The tokenizer the run trained with: the adapter's copy, else the base's."""
    from mistral_qlora.model.tokenizer import load_tokenizer

    has_own = (Path(adapter) / "tokenizer_config.json").is_file()
    return load_tokenizer(adapter if has_own else base_path)


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(_existing_ancestor(folder)).free
    if free < needed:
        raise UserError(f"--output {what}: needs about {needed / 1e9:.2f} GB, {folder} has {free / 1e9:.2f} GB "
                        "free; free some space or write elsewhere")


def export_model(adapter: str, output: str, fmt: str = "gguf", qtype: str | None = None,
                 model: str | None = None, overwrite: bool = False, base_gguf: str | None = None) -> list[Path]:
    """Write the merged model (or, for gguf-lora, the adapter alone); returns the files (GGUF and
    Modelfile) or the folder written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use gguf, gguf-lora or safetensors")
    if fmt == "gguf-lora":
        if qtype not in (None, "f32"):
            raise UserError(f"--type {qtype!r}: a gguf-lora adapter is written in f32 (its tensors are small)")
        return [*export_gguf_lora(adapter, Path(output), model, overwrite, base_gguf)]
    if fmt == "safetensors":
        qtype = qtype or "bf16"
        if qtype not in SAFETENSORS_TYPES:
            raise UserError(f"--type {qtype!r}: safetensors takes {', '.join(SAFETENSORS_TYPES)} (q8_0 is a GGUF type)")
        return [merge_adapter(adapter, output, SAFETENSORS_TYPES[qtype], model, overwrite=overwrite)]
    qtype = qtype or "f16"
    if qtype not in gguf_file.TYPES:
        raise UserError(f"--type {qtype!r}: GGUF takes {', '.join(gguf_file.TYPES)}")
    return [*export_gguf(adapter, Path(output), qtype, model, overwrite)]


def _check_output(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise UserError(f"--output {out}: is a folder; name the .gguf file to write")
    if out.exists() and not overwrite:
        raise UserError(f"--output {out}: exists; pass --overwrite to replace it")


def _base_config(adapter: str, model: str | None):
    from transformers import AutoConfig

    base_name, path = resolve_base(adapter, model)
    try:
        return AutoConfig.from_pretrained(path), path
    except (OSError, ValueError) as exc:
        raise UserError(f"adapter {adapter}: cannot load the config of its base model {base_name!r}: "
                        f"{str(exc).splitlines()[0]}; pass --model with the base it was trained on") from None


def _write_atomic(out: Path, write) -> None:
    """`write(tmp)` under a temporary name in out's folder, renamed to `out` when whole."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _write_modelfile(out: Path, text: str) -> Path:
    modelfile = modelfile_path(out)
    atomic_write_text(modelfile, text)
    return modelfile


def run_chat_format(adapter: str, tokenizer) -> ChatFormat:
    """The chat format of the run the adapter came from (its data.template, else auto)."""
    return chat_format(run_template(adapter), tokenizer)


def export_gguf(adapter: str, out: Path, qtype: str, model: str | None, overwrite: bool) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    _check_output(out, overwrite)
    config, path = _base_config(adapter, model)
    rope_scaling = adapter_rope_scaling(adapter)
    if rope_scaling is not None:  # the scaling it was trained under, as load_merged gives the merged config
        apply_rope_scaling(config, rope_scaling, where=f"adapter {adapter}: rope_scaling")
    hyper = gguf_file.Hyper.from_config(config)
    tokenizer = load_export_tokenizer(adapter, path)
    vocab = read_vocab(adapter, path, tokenizer, hyper.vocab)
    fmt = run_chat_format(adapter, tokenizer)
    with torch.device("meta"):  # shapes only: nothing is allocated
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    plan = gguf_file.tensor_plan(shapes, hyper)
    check_free_space(out.parent, gguf_file.estimate_bytes(plan, qtype, vocab), str(out))

    merged, _ = load_merged(adapter, MERGE_DTYPE[qtype], model)
    tensors = merged.state_dict()
    _write_atomic(out, lambda tmp: gguf_file.write_gguf(tmp, out.stem, hyper, vocab, tensors, plan, qtype, fmt.jinja))
    return out, _write_modelfile(out, modelfile_text(out.name, fmt))


def export_gguf_lora(adapter: str, out: Path, model: str | None, overwrite: bool,
                     base_gguf: str | None) -> tuple[Path, Path]:
    """The adapter alone in llama.cpp's LoRA format (tools/gguf_lora.py), and a Modelfile that puts
    it over the base GGUF (`base_gguf`, else a placeholder to edit)."""
    from mistral_qlora.tools import gguf_lora

    _check_output(out, overwrite)
    config, path = _base_config(adapter, model)
    hyper = gguf_file.Hyper.from_config(config)
    adapter_config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    gguf_lora.lora_alpha(adapter, adapter_config)  # refuses what the format cannot carry, before writing
    fmt = run_chat_format(adapter, load_export_tokenizer(adapter, path))
    _write_atomic(out, lambda tmp: gguf_lora.write_lora_gguf(tmp, out.stem, adapter, hyper))
    base = Path(os.path.relpath(Path(base_gguf).absolute(), out.parent.absolute())) if base_gguf else Path("BASE.gguf")
    return out, _write_modelfile(out, modelfile_text(str(base), fmt, adapter_gguf=out.name))
