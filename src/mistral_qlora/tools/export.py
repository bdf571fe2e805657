"""`mistral-qlora export`: a trained adapter folded into its base and written for the runtimes a
model is deployed with: one GGUF file (llama.cpp, Ollama, LM Studio) with an Ollama Modelfile
beside it, or safetensors shards (what `merge` writes).

Every check a user can fail runs before the base loads: format and type, the output path, the
base, the tokenizer, and the free disk space for the file as estimated from the tensor shapes and
the type. The GGUF is written under a temporary name in the output's folder and renamed when whole.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mistral_qlora.errors import UserError
from mistral_qlora.files import atomic_write_text
from mistral_qlora.tools import gguf_file
from mistral_qlora.tools.merge import load_merged, merge_adapter, resolve_base

FORMATS = ("gguf", "safetensors")
# --type for safetensors -> merge's dtype
SAFETENSORS_TYPES = {"bf16": "bf16", "f16": "fp16", "fp32": "fp32"}
# --type for GGUF -> the dtype the base is merged in: f16 rounds once to f16; bf16 and q8_0
# start from the checkpoint's own bf16 (q8_0's step, max|block|/127, dwarfs bf16's rounding)
MERGE_DTYPE = {"f16": "fp16", "bf16": "bf16", "q8_0": "bf16"}

# The Mistral v1 instruct template (gguf_file.CHAT_TEMPLATE) in Ollama's Go template language: a
# system message goes before the next question.
OLLAMA_TEMPLATE = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""


def modelfile_text(gguf_name: str) -> str:
    return (f"# Ollama: ollama create NAME -f THIS_FILE, then ollama run NAME\n"
            f"FROM ./{gguf_name}\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
            'PARAMETER stop "</s>"\n'
            'PARAMETER stop "[INST]"\n')


def modelfile_path(out: Path) -> Path:
    """`NAME.Modelfile` beside `NAME.gguf`, so several exports can share a folder."""
    return out.with_name(out.stem + ".Modelfile")


def sentencepiece_file(adapter: str, base_path: str) -> Path:
    """The SentencePiece model the GGUF vocabulary is built from: the adapter's copy, else the base's."""
    for folder in (Path(adapter), Path(base_path)):
        if (folder / "tokenizer.model").is_file():
            return folder / "tokenizer.model"
    if not Path(base_path).exists():  # a hub id: its cached files (or the hub)
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(base_path, "tokenizer.model"))
        except Exception as exc:  # noqa: BLE001 - any hub failure means the file is not available
            raise UserError(f"base model {base_path!r}: cannot get its tokenizer.model: "
                            f"{str(exc).splitlines()[0]}") from None
    raise UserError(f"{base_path}: no tokenizer.model (the SentencePiece file the GGUF vocabulary is built from)")


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
                 model: str | None = None, overwrite: bool = False) -> list[Path]:
    """Write the merged model; returns the files (GGUF and Modelfile) or the folder written."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: use gguf or safetensors")
    if fmt == "safetensors":
        qtype = qtype or "bf16"
        if qtype not in SAFETENSORS_TYPES:
            raise UserError(f"--type {qtype!r}: safetensors takes {', '.join(SAFETENSORS_TYPES)} (q8_0 is a GGUF type)")
        return [merge_adapter(adapter, output, SAFETENSORS_TYPES[qtype], model, overwrite=overwrite)]
    qtype = qtype or "f16"
    if qtype not in gguf_file.TYPES:
        raise UserError(f"--type {qtype!r}: GGUF takes {', '.join(gguf_file.TYPES)}")
    return [*export_gguf(adapter, Path(output), qtype, model, overwrite)]


def export_gguf(adapter: str, out: Path, qtype: str, model: str | None, overwrite: bool) -> tuple[Path, Path]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if out.is_dir():
        raise UserError(f"--output {out}: is a folder; name the .gguf file to write")
    if out.exists() and not overwrite:
        raise UserError(f"--output {out}: exists; pass --overwrite to replace it")

    base_name, path = resolve_base(adapter, model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"adapter {adapter}: cannot load the config of its base model {base_name!r}: "
                        f"{str(exc).splitlines()[0]}; pass --model with the base it was trained on") from None
    hyper = gguf_file.Hyper.from_config(config)
    vocab = gguf_file.read_sentencepiece(sentencepiece_file(adapter, path), hyper.vocab)
    with torch.device("meta"):  # shapes only: nothing is allocated
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    plan = gguf_file.tensor_plan(shapes, hyper)
    check_free_space(out.parent, gguf_file.estimate_bytes(plan, qtype, vocab), str(out))

    merged, _ = load_merged(adapter, MERGE_DTYPE[qtype], model)
    tensors = merged.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        gguf_file.write_gguf(tmp, out.stem, hyper, vocab, tensors, plan, qtype)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    modelfile = modelfile_path(out)
    atomic_write_text(modelfile, modelfile_text(out.name))
    return out, modelfile
