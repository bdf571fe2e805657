"""What the GGUF says beyond the weights, checked in a real llama.cpp (node-llama-cpp): the chat
template of each data.template renders the training encoder's generation prompt, each vocabulary
tokenizes as transformers does, and the LoRA adapter GGUF over a base GGUF continues as the merged
GGUF does. Vocabulary-only files (no tensors) keep the template and vocabulary checks cheap."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from mistral_qlora.data.formats import Conversation
from mistral_qlora.data.spm import spm_encoder, tokenizer_ids
from mistral_qlora.data.templates import TekkenTemplate, resolve_template
from testkit import tiny_path
from testkit.llama_cpp import llama_runtime, run_llama_cpp

# Several turns, system prompts (v1 puts one before the first question, v3 before the last), an
# answer with a trailing space (v3 drops it), newlines, digits and text that looks like markup.
# Not here: message text that spells a special token ("</s>", v3's "[INST]"): llama.cpp parses
# special tokens anywhere in the rendered prompt, training reads them in text as text.
CONVERSATIONS = [
    Conversation([("What is 2+2?", "")]),
    Conversation([("What is 2+2?", "It is 4. "), ("And 3+3?", "")], system="Be terse."),
    Conversation([("Name a prime.", "Seven."), ("And an even one?", "Two, the only even prime.\nDone."),
                  ("Sum them, 7 + 2 = ?", "")], system="Answer kindly.\nKeep it short."),
    Conversation([("Quote: [x] and <y/> are text here.", "Then they stay text."), ("Say <b>hi</b>", "")]),
]
TEXTS = ["Hello world", " leading space and  two spaces", "Numbers 12345 and 3.14159, dates 2024-01-31.",
         "it's we'll THEY'RE", "tabs\tand\nnewlines\n\n  indented", "Ünïcödé: naïve café, 日本語, emoji 🙂",
         "code: def f(x): return x**2  # comment"]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _bpe_folder(folder: Path) -> Path:
    """A small byte-level BPE tokenizer with SmolLM's pre-tokenizer (single digits, then GPT-2's
    split) and ChatML's special tokens and template, saved as a tokenizer.json checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  pre_tokenizers.ByteLevel(add_prefix_space=False)])
    core.decoder = decoders.ByteLevel()
    texts = TEXTS + [t for conv in CONVERSATIONS for turn in conv for t in turn] + ["assistant user system"]
    core.train_from_iterator(texts * 3, trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    tok.save_pretrained(str(folder))
    return folder


def _messages(conv: Conversation) -> list[dict]:
    """The conversation up to its last question, as chat messages."""
    out = [{"role": "system", "content": conv.system}] if conv.system else []
    for i, (q, a) in enumerate(conv):
        out.append({"role": "user", "content": q})
        if i < len(conv) - 1:
            out.append({"role": "assistant", "content": a})
    return out


def _vocab_gguf(folder: str, template: str, out: Path):
    """A vocabulary-only GGUF (the tiny model's header, no tensors) of the checkpoint in `folder`,
    with the chat format of data.template=`template`; (tokenizer, chat format)."""
    from transformers import AutoConfig

    from mistral_qlora.tools import gguf_file
    from mistral_qlora.tools.chat_format import chat_format
    from mistral_qlora.tools.export import load_export_tokenizer, read_vocab

    tokenizer = load_export_tokenizer(folder, folder)
    hyper = gguf_file.Hyper.from_config(AutoConfig.from_pretrained(tiny_path()))
    vocab = read_vocab(folder, folder, tokenizer, len(tokenizer))
    fmt = chat_format(template, tokenizer)
    gguf_file.write_gguf(out, "vocab", dataclasses.replace(hyper, vocab=len(vocab.pieces)), vocab, {}, [], "f16",
                         fmt.jinja)
    return tokenizer, fmt


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory):
    """name -> (checkpoint folder, data.template): SentencePiece v1, v3 and v7, byte-level BPE (Tekken:
    test_tekken_export_runs_in_llama_cpp_as_in_training, on the exported file)."""
    from mistral_qlora.model.tokenizer import write_mistral_tokenizer

    root = tmp_path_factory.mktemp("vocab")
    write_mistral_tokenizer(root / "v3", "v3")
    write_mistral_tokenizer(root / "v7", "v7")
    return {"mistral-v1": (tiny_path(), "mistral-v1"), "mistral-v3": (str(root / "v3"), "mistral-v3"),
            "mistral-v7": (str(root / "v7"), "mistral-v7"), "bpe-chatml": (str(_bpe_folder(root / "bpe")), "tokenizer")}


@pytest.mark.parametrize("name", ["mistral-v1", "mistral-v3", "mistral-v7", "bpe-chatml"])
def test_llama_cpp_renders_the_training_prompt_and_tokenizes_as_transformers(name, vocabularies, tmp_path):
    folder, template_name = vocabularies[name]
    tokenizer, fmt = _vocab_gguf(folder, template_name, tmp_path / f"{name}.gguf")
    _check_vocabulary_in_llama_cpp(tmp_path / f"{name}.gguf", tokenizer, template_name, fmt, tmp_path)


def _check_vocabulary_in_llama_cpp(path: Path, tokenizer, template_name: str, fmt, tmp_path: Path) -> None:
    """llama.cpp renders CONVERSATIONS with the file's template to the training encoder's prompt
    ids, and tokenizes TEXTS as the training encoder does."""
    runtime = llama_runtime()
    template = resolve_template(template_name, tokenizer)
    got = run_llama_cpp(runtime, "llama_cpp_vocab.mjs", {
        "model": str(path), "texts": TEXTS, "chats": [_messages(c) for c in CONVERSATIONS]}, tmp_path)
    assert got["template"] == fmt.jinja
    for conv, ids in zip(CONVERSATIONS, got["chats"]):
        assert ids == template.generation_ids(conv), (conv, tokenizer.convert_ids_to_tokens(ids))
    # Texts as the training encoder tokenizes them: mistral-common's Tekkenizer for Tekken,
    # SentencePiece itself for a tokenizer.model (data/spm.py; transformers' v3 tokenizer drops a
    # doubled space that SentencePiece, mistral-common and llama.cpp keep), the transformers tokenizer
    # otherwise.
    encoder = template.encoder if isinstance(template, TekkenTemplate) else spm_encoder(tokenizer)
    expected = encoder.encode_ragged(TEXTS).lists() if encoder is not None else tokenizer_ids(tokenizer, TEXTS)
    assert got["texts"] == [list(e) for e in expected]


def test_the_gguf_vocabulary_of_each_kind(vocabularies, tmp_path):
    from gguf import GGUFReader

    from mistral_qlora.tools.gguf_vocab import CONTROL

    _, fmt = _vocab_gguf(vocabularies["bpe-chatml"][0], "tokenizer", tmp_path / "bpe.gguf")
    fields = GGUFReader(tmp_path / "bpe.gguf").fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [CONTROL] * 3
    assert fields["tokenizer.ggml.merges"].contents()[0].count(" ") == 1
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False  # ChatML opens with no BOS
    assert fields["tokenizer.chat_template"].contents() == CHATML and fmt.ollama is None
    assert fmt.stops == ("<|im_end|>",)


def test_modelfile_follows_the_runs_template(vocabularies):
    from mistral_qlora.model.tokenizer import load_tokenizer
    from mistral_qlora.tools.chat_format import OLLAMA_V3, chat_format, modelfile_text

    v3 = chat_format("mistral-v3", load_tokenizer(vocabularies["mistral-v3"][0]))
    text = modelfile_text("m.gguf", v3)
    assert f'TEMPLATE """{OLLAMA_V3}"""' in text and 'PARAMETER stop "</s>"' in text
    chatml = chat_format("tokenizer", load_tokenizer(vocabularies["bpe-chatml"][0]))
    lines = modelfile_text("m.gguf", chatml, adapter_gguf="a.gguf").splitlines()
    assert "FROM ./m.gguf" in lines and "ADAPTER ./a.gguf" in lines
    assert not any(line.startswith("TEMPLATE") for line in lines) and 'PARAMETER stop "<|im_end|>"' in lines


def test_a_run_folder_template_decides_the_exported_template(tmp_path):
    """An adapter under a run folder whose config.yaml says mistral-v3 exports v3 (here refused, as
    training would refuse it: the tiny model's vocabulary is v1), not auto's v1."""
    from mistral_qlora.errors import UserError
    from mistral_qlora.model.tokenizer import load_tokenizer
    from mistral_qlora.tools.export import run_chat_format

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    tokenizer = load_tokenizer(tiny_path())
    assert run_chat_format(str(run / "adapter"), tokenizer).name == "mistral-v1"  # no config.yaml: auto
    (run / "config.yaml").write_text("data:\n  template: mistral-v3\n")
    with pytest.raises(UserError, match="mistral-v3"):
        run_chat_format(str(run / "adapter"), tokenizer)


# --- the LoRA adapter GGUF ----------------------------------------------------------------------

def _adapter(folder: Path, init: bool, base_name: str = "tiny-random-mistral") -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.adapter import record_base_model
    from mistral_qlora.model.base import resolve_model_path

    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(base_name), dtype=torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = get_peft_model(base, LoraConfig(
            r=8, lora_alpha=32, init_lora_weights=init,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.save_pretrained(str(folder))
    record_base_model(folder, base_name)
    return folder


@torch.no_grad()
def test_tekken_export_runs_in_llama_cpp_as_in_training(tmp_path):
    """The tiny Tekken checkpoint (Mistral-Nemo's tekken.json, instruct version v3; head_dim 32, not
    hidden/heads) exported through `export`: llama.cpp renders and tokenizes as the training
    encoder does, and from the encoder's prompts its greedy tokens are transformers' (on the
    weights rounded to f16, as the file holds them), parting only at a near-tie."""
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.tools.chat_format import JINJA_V3, chat_format
    from mistral_qlora.tools.export import export_model, load_export_tokenizer

    runtime = llama_runtime()
    folder = resolve_model_path("tiny-random-tekken")
    adapter = _adapter(tmp_path / "zero", init=True, base_name="tiny-random-tekken")  # B = 0: merged = base
    gguf_path, _ = export_model(str(adapter), str(tmp_path / "tekken.gguf"), qtype="f16")
    fields = GGUFReader(gguf_path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "tekken"
    tokenizer = load_export_tokenizer(str(adapter), folder)
    fmt = chat_format("mistral-tekken", tokenizer)
    assert fmt.jinja == JINJA_V3
    _check_vocabulary_in_llama_cpp(gguf_path, tokenizer, "mistral-tekken", fmt, tmp_path)

    template = resolve_template("mistral-tekken", tokenizer)
    prompts = [template.generation_ids(c) for c in CONVERSATIONS[:3]]
    steps = 8
    got = run_llama_cpp(runtime, "llama_cpp_greedy.mjs", {"models": [str(gguf_path)], "prompts": prompts,
                                                           "steps": steps, "top": 5}, tmp_path)[str(gguf_path)]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16).float().eval()
    for prompt, answer in zip(prompts, got):
        ids = torch.tensor([prompt])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                             do_sample=False, pad_token_id=11)[0, len(prompt):].tolist()
        logits = model(torch.tensor([prompt + answer["tokens"]])).logits[0, len(prompt) - 1:-1]
        for step, top in enumerate(answer["top"]):
            assert all(abs(v - logits[step, t].item()) < 0.05 for t, v in top), (step, top)
        if answer["tokens"] != out:
            step = next(i for i, (a, b) in enumerate(zip(answer["tokens"], out)) if a != b)
            best, second = logits[step].topk(2).values.tolist()
            assert best - second < 0.05, (answer["tokens"], out)


def test_lora_gguf_over_the_base_continues_as_the_merged_gguf(tmp_path):
    """base.gguf (the export of an adapter whose B is zero: the base itself) + adapter.gguf gives
    llama.cpp's greedy tokens of merged.gguf; logits agree to f16 rounding."""
    from gguf import GGUFReader

    from mistral_qlora.model.tokenizer import load_tokenizer
    from mistral_qlora.tools.export import export_model

    runtime = llama_runtime()
    trained = _adapter(tmp_path / "trained", init=False)
    base_gguf, _ = export_model(str(_adapter(tmp_path / "zero", init=True)), str(tmp_path / "base.gguf"), qtype="f16")
    merged_gguf, _ = export_model(str(trained), str(tmp_path / "merged.gguf"), qtype="f16")
    lora_gguf, modelfile = export_model(str(trained), str(tmp_path / "lora.gguf"), fmt="gguf-lora",
                                        base_gguf=str(base_gguf))
    assert "FROM ./base.gguf" in modelfile.read_text() and "ADAPTER ./lora.gguf" in modelfile.read_text()
    reader = GGUFReader(lora_gguf)
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"
    assert reader.fields["adapter.lora.alpha"].contents() == 32
    shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert shapes["blk.0.attn_q.weight.lora_a"][1] == shapes["blk.0.attn_q.weight.lora_b"][0] == 8

    tokenizer = load_tokenizer(tiny_path())
    prompts = [[1] + tokenizer(f"[INST] {q} [/INST]", add_special_tokens=False)["input_ids"]
               for q in ("What is the capital of France?", "Name a colour.", "Count to three.")]
    got = run_llama_cpp(runtime, "llama_cpp_greedy.mjs", {
        "models": [str(merged_gguf), {"model": str(base_gguf), "lora": str(lora_gguf), "key": "lora"},
                   str(base_gguf)],
        "prompts": prompts, "steps": 12, "top": 5}, tmp_path)
    moved = 0
    for merged, lora, base in zip(got[str(merged_gguf)], got["lora"], got[str(base_gguf)]):
        for m_top, l_top in zip(merged["top"], lora["top"]):
            l_logits = dict((t, v) for t, v in l_top)
            assert all(abs(v - l_logits[t]) < 0.05 for t, v in m_top if t in l_logits), (m_top, l_top)
        parted = next((i for i, (a, b) in enumerate(zip(merged["tokens"], lora["tokens"])) if a != b), None)
        if parted is not None:  # only at a near-tie of merged's two best
            best, second = sorted((v for _, v in merged["top"][parted]), reverse=True)[:2]
            assert best - second < 0.05, (merged["tokens"], lora["tokens"])
        moved += merged["top"][0] != base["top"][0]
    assert moved  # the adapter changes what the base says


@pytest.mark.parametrize("change, words", [({"use_dora": True}, "DoRA"),
                                           ({"modules_to_save": ["lm_head"]}, "modules_to_save")])
def test_gguf_lora_refuses_what_the_format_cannot_carry(change, words, tmp_path, capsys):
    from mistral_qlora.cli import main

    folder = _adapter(tmp_path / "a", init=False)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    out = tmp_path / "out" / "a.gguf"
    capsys.readouterr()  # the adapter's making is not the command's output
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--adapter", str(folder), "--output", str(out), "--format", "gguf-lora"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and words in err, err
    assert not out.parent.exists()


def test_a_pre_tokenizer_llama_cpp_cannot_name_is_refused(vocabularies, tmp_path):
    from mistral_qlora.errors import UserError
    from mistral_qlora.model.tokenizer import load_tokenizer
    from mistral_qlora.tools.gguf_vocab import read_bpe

    folder = tmp_path / "odd"
    shutil.copytree(vocabularies["bpe-chatml"][0], folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match="pre-tokenizer.*Whitespace.*no llama.cpp equivalent"):
        read_bpe(folder / "tokenizer.json", load_tokenizer(str(folder)), 1000)


# --- a real model -------------------------------------------------------------------------------

# Questions whose answers run long (up to the 32 tokens looked at) and short, none from the data.
SMOLLM2_QUESTIONS = ("What is the capital of France?", "Write a haiku about the sea.", "List three fruits.",
                     "Why is the sky blue?", "How do bees make honey?", "Explain what a verb is.")


def _story_prompt_response(n: int) -> list[dict]:
    """The sample data (dataset/story.json, Mistral-formatted text) as prompt/response records, so
    the checkpoint's own chat template (ChatML) renders them as it would any chat data."""
    import re

    from testkit import ROOT

    records = []
    for record in json.loads((ROOT / "dataset/story.json").read_text())[:n]:
        m = re.fullmatch(r"<s>\[INST\] (.*?) \[/INST\] (.*?) </s>", record["text"], re.S)
        records.append({"prompt": m[1], "response": m[2]})
    return records


@pytest.mark.slow
def test_smollm2_fine_tuned_exports_run_in_llama_cpp_as_in_transformers(tmp_path):
    """SmolLM2-135M-Instruct (Llama architecture, tied embeddings, byte-level BPE, ChatML) fine-tuned
    briefly by `train` on the sample data: its f16 GGUF continues ChatML prompts greedily as
    transformers does on the merged model (the same fp16 merge, float32 logits) for 32 tokens, all
    but at most two of six prompts whole and those parting only at a near-tie of the best two; its
    q8_0 GGUF's top-1, teacher-forced on transformers' answers, is transformers' token at least 95%
    of the time. A 16-bit base (plain LoRA) keeps the run short on CPUs; the export is the same
    either way, since an adapter is always merged into the 16-bit base."""
    from mistral_qlora.config import load_config
    from mistral_qlora.model.tokenizer import load_tokenizer
    from mistral_qlora.tools.export import export_model
    from mistral_qlora.tools.merge import load_merged
    from mistral_qlora.train import run_training
    from testkit import ROOT
    from testkit.smollm2 import smollm2_gguf, smollm2_path

    runtime = llama_runtime()
    (tmp_path / "qa.json").write_text(json.dumps(_story_prompt_response(64)))
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"model.name_or_path={smollm2_gguf()}", f"data.train={tmp_path / 'qa.json'}", "data.max_seq_len=256",
        "data.tokens_per_row=256", "quantization.bits=16", "lora.fused=false", "lora.r=8", "lora.alpha=16",
        "train.gradient_checkpointing=false", "train.max_steps=24", "train.learning_rate=1e-3",
        "train.eval_steps=1000", "eval.samples=0", f"output_dir={tmp_path / 'run'}"])
    summary = run_training(cfg)
    assert summary["final_eval_loss"] < summary["initial_eval_loss"]  # it learned from the data
    adapter = tmp_path / "run" / "adapter"
    files = {t: export_model(str(adapter), str(tmp_path / f"smol-{t}.gguf"), qtype=t)[0] for t in ("f16", "q8_0")}

    tokenizer = load_tokenizer(smollm2_path())
    template = resolve_template("auto", tokenizer)
    assert template.name == "tokenizer"  # ChatML, the checkpoint's own
    prompts = [template.generation_ids(Conversation([(q, "")])) for q in SMOLLM2_QUESTIONS]
    steps = 32
    got = run_llama_cpp(runtime, "llama_cpp_greedy.mjs", {"models": [str(files["f16"])], "prompts": prompts,
                                                          "steps": steps, "top": 2}, tmp_path)
    # The f16 file holds the fp16 merge: the reference is that merge, computed in float32.
    reference = load_merged(str(adapter), "fp16")[0].float().eval()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answers, whole, parted = [], 0, []
    for prompt, f16 in zip(prompts, got[str(files["f16"])]):
        # greedy on past the end of the answer as llama.cpp's loop does (generate would stop, or with
        # min_new_tokens forbid the end token)
        tokens, gaps, cache, step_ids = [], [], None, torch.tensor([prompt])
        for _ in range(steps):
            with torch.no_grad():
                result = reference(step_ids, past_key_values=cache, use_cache=True)
            logits = result.logits[0, -1]
            top2 = logits.topk(2)
            cache, best = result.past_key_values, int(top2.indices[0])
            tokens.append(best)
            gaps.append((float(top2.values[0] - top2.values[1]), int(top2.indices[1])))
            step_ids = torch.tensor([[best]])
        i = next((k for k, (a, b) in enumerate(zip(f16["tokens"], tokens)) if a != b), None)
        if i is None:
            whole += 1
        else:
            # fp16 weights against float32 arithmetic may only part at a near-tie of the two best
            # tokens: llama.cpp took transformers' second choice, less than 0.05 below its first
            gap, second = gaps[i]
            parted.append((i, gap, tokenizer.decode(tokens[:i + 1])))
            assert f16["tokens"][i] == second and gap < 0.05, parted[-1]
        answers.append(tokens[:tokens.index(end) + 1] if end in tokens else tokens)
    # several prompts (most of them) agree on all 32 tokens
    assert whole >= len(prompts) - 2, parted
    # q8_0, teacher-forced on transformers' answers (up to their end token): its top-1 at each position
    q8 = run_llama_cpp(runtime, "llama_cpp_greedy.mjs", {"models": [str(files["q8_0"])], "prompts": prompts,
                                                         "forced": answers, "steps": 0, "top": 1},
                       tmp_path)[str(files["q8_0"])]
    expected = [t for answer in answers for t in answer]
    predicted = [t for r in q8 for t in r["tokens"]]
    assert len(predicted) == len(expected) >= 100
    agree = sum(int(p == e) for p, e in zip(predicted, expected))
    assert agree / len(expected) >= 0.95, (agree, len(expected))
