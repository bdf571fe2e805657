"""Chat templates (data/templates.py): token for token against mistral-common's v1 and v3 encoders,
against apply_chat_template for a Jinja template with its assistant mask, `auto`, and refusals."""

import json

import pytest

from mistral_qlora.data.formats import Conversation, records_to_conversations
from mistral_qlora.data.templates import IGNORE_INDEX, mistral_version, resolve_template
from mistral_qlora.data.tokenize import tokenize_conversations
from mistral_qlora.errors import UserError
from mistral_qlora.model.base import resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer, write_mistral_tokenizer

from testkit.llama import chatml_bpe_tokenizer
from testkit.mistral_reference import assistant_message, chat_request, mistral_common_tokenizer
from testkit import ROOT, run_cli

CONVERSATIONS = [
    Conversation([("What is 2+2?", "It is 4.")]),
    Conversation([("What is 2+2?", "It is 4.")], system="You are a terse calculator."),
    Conversation([("Name a prime.", "Seven."), ("And an even one?", "Two, the only even prime."),
                  ("Sum them.", "Nine.\nThat is all.")]),
    Conversation([("Hi there!", "Hello! How can I help?"), ("Tell me a joke.", "Why did the chicken cross?")],
                 system="Answer kindly.\nKeep it short."),
    Conversation([("Quote: [INST] and </s> are text here.", "Then </s> stays text too.")], system="Literal."),
]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_UNMARKED = CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
# Starts with the number of messages: a rendering of the first turns is no prefix of the whole.
COUNTING = "{{ messages | length }} messages\n" + CHATML_UNMARKED


@pytest.fixture(scope="module")
def v1():
    return load_tokenizer(resolve_model_path("tiny-random-mistral"))


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v3")
    write_mistral_tokenizer(folder, "v3")
    return load_tokenizer(str(folder))


def _bpe_tokenizer(chat_template: str | None):
    """A small byte-level BPE tokenizer (not Mistral's vocabulary) with ChatML's special tokens."""
    texts = [t for conv in CONVERSATIONS for turn in conv for t in turn] + [c.system for c in CONVERSATIONS]
    return chatml_bpe_tokenizer(texts * 3, 400, chat_template, bos_token="<|endoftext|>", additional=("<|im_start|>",))


def _learned_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The runs of consecutive trained tokens, in order."""
    runs, run = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            run.append(t)
        elif run:
            runs.append(run)
            run = []
    return runs + ([run] if run else [])


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_mistral_templates_match_mistral_common_token_for_token(version, v1, v3):
    tokenizer = {"v1": v1, "v3": v3}[version]
    template = resolve_template(f"mistral-{version}", tokenizer)
    mc = mistral_common_tokenizer(version, finetuning=True)
    serving = mistral_common_tokenizer(version, finetuning=False)
    encoded = template.encode(CONVERSATIONS)
    for conv, (ids, labels) in zip(CONVERSATIONS, encoded):
        assert ids == mc.encode_chat_completion(chat_request(conv)).tokens, conv
        # Learned: every assistant message as mistral-common encodes it (content + EOS), nothing else.
        answers = []
        for _, answer in conv:
            answers += mc.instruct_tokenizer.encode_assistant_message(assistant_message(answer), False)
        assert [t for t, label in zip(ids, labels) if label != IGNORE_INDEX] == answers
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
        # The prompt a model answers: what mistral-common sends a model to answer the last turn.
        assert template.generation_ids(conv) == serving.encode_chat_completion(chat_request(conv, False)).tokens


def test_system_prompt_goes_where_each_version_puts_it(v1, v3):
    conv = CONVERSATIONS[3]
    t1 = resolve_template("mistral-v1", v1)
    t3 = resolve_template("mistral-v3", v3)
    text1 = v1.decode(t1.encode([conv])[0][0])
    text3 = v3.decode(t3.encode([conv])[0][0])
    assert "[INST] Answer kindly.\nKeep it short.\n\nHi there! [/INST]" in text1  # v1: the first user message
    assert "[INST] Answer kindly.\nKeep it short.\n\nTell me a joke.[/INST]" in text3  # v3: the last one


def test_unknown_template_is_a_config_error_naming_the_key():
    from mistral_qlora.config import load_config

    with pytest.raises(UserError, match=r"data.template"):
        load_config(str(ROOT / "configs/tiny.yaml"), ["data.template=chatml"])


def test_version_detection_and_auto(v1, v3):
    assert mistral_version(v1) == "v1" and mistral_version(v3) == "v3"
    assert resolve_template("auto", v1).name == "mistral-v1"
    assert resolve_template("auto", v3).name == "mistral-v3"
    bpe = _bpe_tokenizer(None)
    assert mistral_version(bpe) is None
    assert resolve_template("auto", bpe).name == "mistral-v1"  # neither Mistral nor a chat template
    assert resolve_template("auto", _bpe_tokenizer(CHATML)).name == "tokenizer"
    v1_own = load_tokenizer(resolve_model_path("tiny-random-mistral"))
    v1_own.chat_template = "{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    assert resolve_template("auto", v1_own).name == "mistral-v1"  # Mistral's own kind of template
    v1_own.chat_template = CHATML
    assert resolve_template("auto", v1_own).name == "tokenizer"  # a Mistral fine-tune with its own template
    with pytest.raises(UserError, match=r"data.template=mistral-v3 needs Mistral's v3 vocabulary"):
        resolve_template("mistral-v3", v1)
    with pytest.raises(UserError, match=r"data.template=tokenizer: .* has no chat template"):
        resolve_template("tokenizer", v1)
    with pytest.raises(UserError, match=r"data.template: unknown template 'chatml'"):
        resolve_template("chatml", v1)


def test_jinja_template_matches_apply_chat_template_and_its_assistant_mask():
    tok = _bpe_tokenizer(CHATML)
    template = resolve_template("tokenizer", tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    (newline,) = tok("\n", add_special_tokens=False)["input_ids"]
    assert template.stop_token_ids() == [tok.eos_token_id]  # eos is <|im_end|> here
    for conv, (ids, labels) in zip(CONVERSATIONS, template.encode(CONVERSATIONS)):
        messages = [{"role": "system", "content": conv.system}] if conv.system else []
        for prompt, answer in conv:
            messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        ref = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"]
        mask = [label != IGNORE_INDEX for label in labels]
        assert all(keep for keep, m in zip(mask, ref["assistant_masks"]) if m)  # the marks, and the turn's end
        # Token by token: each learned run is one answer's content, its <|im_end|> and the newline the
        # template ends the assistant message with, in order.
        assert _learned_runs(ids, labels) == [tok(a, add_special_tokens=False)["input_ids"] + [im_end, newline]
                                              for _, a in conv]
    generation = template.generation_ids(CONVERSATIONS[3])
    assert tok.decode(generation).endswith("<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n")


def test_jinja_template_without_generation_marks_is_separated_turn_by_turn():
    marked = resolve_template("tokenizer", _bpe_tokenizer(CHATML))
    unmarked = resolve_template("tokenizer", _bpe_tokenizer(CHATML_UNMARKED))
    assert not unmarked.marked and marked.marked
    assert unmarked.encode(CONVERSATIONS) == marked.encode(CONVERSATIONS)
    assert unmarked.encode(CONVERSATIONS, train_on_prompt=True) == marked.encode(CONVERSATIONS, train_on_prompt=True)
    ids, labels = unmarked.encode(CONVERSATIONS[:1], train_on_prompt=True)[0]
    assert labels == [IGNORE_INDEX] + ids[1:]
    assert unmarked.fingerprint() != marked.fingerprint()


# ChatML with its markers as plain text in the template (not eos_token), as checkpoints ship it.
CHATML_PLAIN = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The same, its {% generation %} blocks around the content alone.
CHATML_CONTENT_MARKED = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chatml_tiny_tokenizer(chat_template: str, special: bool):
    """The tiny model's (Mistral v1) tokenizer with a ChatML template; <|im_start|>/<|im_end|> added
    as special tokens, or left as the text they are in its vocabulary."""
    tok = load_tokenizer(resolve_model_path("tiny-random-mistral"))
    if special:
        tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = chat_template
    return tok


@pytest.mark.parametrize("chat_template", [CHATML_PLAIN, CHATML_CONTENT_MARKED], ids=["separable", "marked"])
def test_chatml_template_trains_the_end_of_each_assistant_turn_and_not_the_prompts(chat_template):
    tok = _chatml_tiny_tokenizer(chat_template, special=True)
    template = resolve_template("tokenizer", tok)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert template.stop_token_ids() == [tok.eos_token_id, im_end] and template.warnings == []
    conv = CONVERSATIONS[3]  # two turns and a system prompt
    ids, labels = template.encode([conv])[0]
    runs = _learned_runs(ids, labels)
    assert len(runs) == len(conv)
    for run, (_, answer) in zip(runs, conv):
        assert run.count(im_end) == 1 and run[-1] != im_end  # <|im_end|> and the newline after it
        text = tok.decode(run)
        assert text.startswith(answer) and text.rstrip(" \n").endswith("<|im_end|>"), text
    learned = tok.decode([t for t, label in zip(ids, labels) if label != IGNORE_INDEX])
    for prompt, _ in conv:
        assert prompt not in learned
    assert "Answer kindly" not in learned and "<|im_start|>" not in learned and "user" not in learned
    assert tok.decode(ids).count("<|im_end|>") == 5  # system, two user turns, two answers; two learned


def test_chatml_template_with_text_markers_learns_them_and_warns_of_no_end_token():
    tok = _chatml_tiny_tokenizer(CHATML_PLAIN, special=False)
    template = resolve_template("tokenizer", tok)
    ids, labels = template.encode([CONVERSATIONS[3]])[0]
    assert [tok.decode(run) for run in _learned_runs(ids, labels)] == [
        f"{answer}<|im_end|>\n" for _, answer in CONVERSATIONS[3]]
    assert template.stop_token_ids() == [tok.eos_token_id]
    (warning,) = template.warnings
    assert "no recognisable end of turn" in warning and "'<|im_end|>\\n'" in warning


def test_prepare_prints_the_warning_of_a_template_without_an_end_of_turn(tmp_path):
    import shutil

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n")
    folder = tmp_path / "tok"
    _chatml_tiny_tokenizer(CHATML_PLAIN, special=False).save_pretrained(str(folder))
    shutil.copyfile(f"{resolve_model_path('tiny-random-mistral')}/config.json", folder / "config.json")
    res = run_cli("prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"model.name_or_path={folder}",
                  "--set", f"data.train={data}", "--set", "data.template=tokenizer")
    assert res.returncode == 0, res.stderr
    (line,) = [line for line in res.stdout.splitlines() if line.startswith("warning:")]
    assert "no recognisable end of turn" in line and "'<|im_end|>\\n'" in line


def test_template_that_cannot_mark_assistant_turns_is_refused():
    with pytest.raises(UserError, match=r"cannot mark the assistant turns \(rendering a conversation turn by turn "
                                        r"does not extend"):
        resolve_template("tokenizer", _bpe_tokenizer(COUNTING))


def test_refusal_is_one_line_and_exit_2(tmp_path):
    import shutil

    folder = tmp_path / "tok"
    _bpe_tokenizer(COUNTING).save_pretrained(str(folder))
    shutil.copyfile(f"{resolve_model_path('tiny-random-mistral')}/config.json", folder / "config.json")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Hi?", "response": "Hello."}) + "\n")
    res = run_cli("prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"model.name_or_path={folder}",
                  "--set", f"data.train={data}", "--set", "data.template=tokenizer")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "cannot mark the assistant turns" in lines[0], res.stderr


def test_tokenize_conversations_uses_the_template(v3):
    convs = records_to_conversations([{"messages": [{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "Hi?"},
                                                    {"role": "assistant", "content": "Hello."}]}], "auto", "x")
    template = resolve_template("auto", v3)
    (ex,), stats = tokenize_conversations(convs, v3, max_seq_len=64, template=template)
    assert (ex["input_ids"], ex["labels"]) == template.encode(convs)[0] and stats.kept == 1
    assert ex["input_ids"][:2] == [v3.bos_token_id, 3]  # <s>[INST] as control tokens
