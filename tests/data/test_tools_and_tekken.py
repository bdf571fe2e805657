"""Tool-call records and the v7 / Tekken templates (data/formats.py, data/templates.py,
data/tekken.py): token for token against mistral-common's encoders for v3, v7, Tekken v3 (Nemo)
and Tekken v7, on hard text, system prompts, several calls and results, and a fuzz set; each
label mask against the assistant messages mistral-common encodes; bad tool records refused."""

import json
import random

import pytest

from mistral_qlora.data.formats import Conversation, records_to_conversations
from mistral_qlora.data.templates import IGNORE_INDEX, mistral_version, resolve_template
from mistral_qlora.errors import UserError
from mistral_qlora.model.tokenizer import load_tokenizer, write_mistral_tokenizer

from testkit.llama import chatml_bpe_tokenizer
from testkit.mistral_reference import chat_request, mistral_common_tokenizer, tekken_v7_file
from testkit.tool_records import HARD, TOOLS, tool_records

KINDS = ["v3", "v7", "tekken", "tekken-v7"]
FUZZ = 1000


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """kind -> (our tokenizer, mistral-common fine-tuning tokenizer, its serving tokenizer)."""
    out = {}
    for kind in KINDS:
        folder = tmp_path_factory.mktemp(kind)
        path = None
        if kind == "tekken-v7":
            path = tekken_v7_file(folder)
        else:
            write_mistral_tokenizer(folder, kind)
        if kind.startswith("tekken"):  # transformers reads tekken.json in a Mistral model's folder
            (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
        version = "tekken" if kind.startswith("tekken") else kind
        out[kind] = (load_tokenizer(str(folder)), mistral_common_tokenizer(version, True, path),
                     mistral_common_tokenizer(version, False, path))
    return out


def _conversations(records):
    return records_to_conversations(records, "auto", "t")


HANDMADE = [
    {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You are helpful.\nUse tools."},
        {"role": "user", "content": "Weather in Paris and 2+3?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "abc123def", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"c\"}"}},
            {"id": "xyz987uvw", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "tool_call_id": "xyz987uvw", "content": "5"},
        {"role": "tool", "tool_call_id": "abc123def", "content": "{\"temp\": 21, \"sky\": \"clear é\"}"},
        {"role": "assistant", "content": "It is 21° and clear in Paris; 2+3 is 5."},
        {"role": "user", "content": "Thanks!  And   Rome?\n"},
        {"role": "assistant", "tool_calls": [{"id": "rom000001", "type": "function",
                                              "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]},
        {"role": "tool", "tool_call_id": "rom000001", "content": "not json  "},
        {"role": "assistant", "content": "Rome: not json."}]},
    # a record that teaches a call: it ends with the call (no result, as fine-tuning allows)
    {"tools": TOOLS[2:], "messages": [{"role": "user", "content": "Search 検索 🦙"},
                                      {"role": "assistant", "tool_calls": [
                                          {"id": "s12345678", "type": "function",
                                           "function": {"name": "search_web", "arguments": "{\"q\": \"🦙\"}"}}]}]},
    {"messages": [{"role": "system", "content": HARD[3]}, {"role": "user", "content": HARD[0]},
                  {"role": "assistant", "content": HARD[4]}, {"role": "user", "content": HARD[9]},
                  {"role": "assistant", "content": HARD[-2]}]},
]


def _check(kind, setups, convs):
    """Each conversation's ids equal mistral-common's; its learned tokens are exactly the runs of
    mistral-common's assistant messages, in order; its generation prompt is what mistral-common
    sends a model to answer."""
    tokenizer, mc, serving = setups[kind]
    template = resolve_template("auto", tokenizer)
    expected = "mistral-tekken" if kind.startswith("tekken") else f"mistral-{kind}"
    assert template.name == expected
    inner = mc.instruct_tokenizer
    for conv, (ids, labels) in zip(convs, template.encode(convs)):
        request = chat_request(conv)
        assert ids == mc.encode_chat_completion(request).tokens, conv
        assert all(label in (IGNORE_INDEX, t) for t, label in zip(ids, labels))
        runs, run = [], []
        for t, label in zip(ids, labels):
            if label != IGNORE_INDEX:
                run.append(t)
            elif run:
                runs.append(run)
                run = []
        runs += [run] if run else []
        normalized = mc._instruct_request_normalizer.from_chat_completion_request(
            mc._chat_completion_request_validator.validate_request(request))
        answers = [inner.encode_assistant_message(m, False) for m in normalized.messages if m.role == "assistant"]
        assert runs == answers, conv
        assert template.generation_ids(conv) == serving.encode_chat_completion(chat_request(conv, False)).tokens


@pytest.mark.parametrize("kind", KINDS)
def test_tool_calls_system_prompts_and_hard_text_match_mistral_common(kind, setups):
    _check(kind, setups, _conversations(HANDMADE))


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_conversations_match_mistral_common_with_their_label_masks(kind, setups):
    records = tool_records(FUZZ, seed=KINDS.index(kind))
    convs = _conversations(records)
    assert sum(c.tools is not None for c in convs) > FUZZ // 2
    assert sum(any(m.get("tool_calls") and len(m["tool_calls"]) > 1 for m in c.chat_messages()) for c in convs) > 50
    _check(kind, setups, convs)


def test_v7_and_tekken_detection_and_forcing(setups):
    v3, v7, tekken, tekken7 = (setups[k][0] for k in KINDS)
    assert mistral_version(v3) == "v3" and mistral_version(v7) == "v7"
    assert resolve_template("mistral-v3", v7).name == "mistral-v3"  # v7's vocabulary has v3's tokens too
    assert resolve_template("mistral-tekken", tekken).version == "v3"
    assert resolve_template("mistral-tekken", tekken7).version == "v7"
    with pytest.raises(UserError, match=r"data.template=mistral-v7 needs Mistral's v7"):
        resolve_template("mistral-v7", v3)
    with pytest.raises(UserError, match=r"data.template=mistral-tekken needs a Tekken vocabulary; .* no tekken.json"):
        resolve_template("mistral-tekken", v7)
    text = v7.decode(resolve_template("auto", v7).encode(_conversations(HANDMADE[2:]))[0][0])
    assert text.startswith("<s>[SYSTEM_PROMPT]") and "[/SYSTEM_PROMPT][INST]" in text


def test_tekken_version_other_than_v3_or_v7_is_refused(tmp_path):
    """v2 here: a version whose format the Tekken template does not encode (as v11 and later)."""
    from testkit.mistral_reference import tekken_v7_file as write

    path = write(tmp_path)
    data = json.loads(path.read_text())
    data["config"]["version"] = "v2"
    path.write_text(json.dumps(data))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    tok = load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match=r"instruct version 'v2'"):
        resolve_template("auto", tok)


def test_v1_refuses_tool_records():
    from mistral_qlora.model.base import resolve_model_path

    tok = load_tokenizer(resolve_model_path("tiny-random-mistral"))
    with pytest.raises(UserError, match=r"mistral-v1 has no tool tokens"):
        resolve_template("auto", tok).encode(_conversations(HANDMADE[:1]))


def test_v3_refuses_content_and_tool_calls_in_one_message(setups):
    record = json.loads(json.dumps(HANDMADE[1]))
    record["messages"][1]["content"] = "Let me search."
    conv = _conversations([record])
    with pytest.raises(UserError, match=r"both content and tool_calls"):
        resolve_template("auto", setups["v3"][0]).encode(conv)
    _check("tekken-v7", setups, conv)  # v7 encodes the text, then the calls


def _bad(mutate):
    record = json.loads(json.dumps(HANDMADE[0]))
    mutate(record)
    return record


BAD = [
    ("a call with no result", lambda r: r["messages"].pop(3), r"the tool call 'xyz987uvw' of message 2 has no result"),
    ("arguments not JSON", lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris"),
     r"message 2's call 'abc123def' is not JSON"),
    ("a result with no call", lambda r: r["messages"][3].update(tool_call_id="nope00000"),
     r"message 3 is a tool result for the call 'nope00000', which no assistant message"),
    ("a tool not in tools", lambda r: r.update(tools=TOOLS[:1]), r"message 2 calls the tool 'add', which is not in"),
    ("no tools at all", lambda r: r.pop("tools"), r"calls the tool 'get_weather', which is not in the record's 'tools' "
                                                  r"\(none given\)"),
]


@pytest.mark.parametrize("what,mutate,message", BAD, ids=[b[0] for b in BAD])
def test_bad_tool_records_name_the_record(what, mutate, message):
    records = [HANDMADE[2], _bad(mutate)]
    with pytest.raises(UserError, match=r"^t record 1 \(0-based\): .*" + message):
        _conversations(records)


def test_bad_tool_record_through_the_cli_is_one_line_and_exit_2(tmp_path):
    from testkit import ROOT, run_cli

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [HANDMADE[2], _bad(BAD[0][1])]) + "\n")
    res = run_cli("prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={data}")
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and "record 1 (0-based)" in lines[0] and "has no result" in lines[0], res.stderr


def test_tool_records_through_an_arrow_table_keep_their_schema(tmp_path, setups):
    """A JSON Lines file read by `datasets` gives every record every key of its column (null
    where absent); the tools and object arguments are read back without those nulls."""
    from mistral_qlora.data.token_cache import RecordTokenizer
    from mistral_qlora.config import DataSection
    import datasets

    data = tmp_path / "d.jsonl"
    records = tool_records(30, seed=11)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    table = datasets.load_dataset("json", data_files=str(data), split="train")
    fn = RecordTokenizer(setups["v3"][0], "messages", "t", DataSection(max_seq_len=100_000))
    convs = fn.conversations(table[:], list(range(len(table))))
    assert convs == _conversations(records)


def test_conversation_equality_includes_messages_and_tools():
    a, b = _conversations(HANDMADE[:1] * 2)
    assert a == b
    b.tools = TOOLS[:1]
    assert a != b
    assert Conversation([("q", "a")]) == Conversation([("q", "a")])


def test_fuzz_records_are_random_but_seeded():
    assert tool_records(5, seed=1) == tool_records(5, seed=1) != tool_records(5, seed=2)
    rng = random.Random(0)
    assert rng.random() < 1


CHATML_TOOLS = (
    "{% if tools %}{{ '<|im_start|>tools\n' + (tools | tojson) + '<|im_end|>\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
    "{% for call in message.get('tool_calls') or [] %}{{ '<call>' + (call['function'] | tojson) }}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chatml_tokenizer(chat_template):
    return chatml_bpe_tokenizer(HARD * 3, 300, chat_template, bos_token="<|endoftext|>", additional=("<|im_start|>",))


def test_jinja_template_renders_tool_records_through_its_own_tools_support():
    tok = _chatml_tokenizer(CHATML_TOOLS)
    template = resolve_template("tokenizer", tok)
    convs = _conversations(HANDMADE)
    for conv, (ids, labels) in zip(convs, template.encode(convs)):
        messages = template._messages(conv)
        ref = tok.apply_chat_template(messages, tools=conv.tools, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        assert ids == ref["input_ids"]
        assert [label != IGNORE_INDEX for label in labels] == [bool(m) for m in ref["assistant_masks"]]
        assert any(label != IGNORE_INDEX for label in labels)
    text = tok.decode(template.generation_ids(convs[0]))
    assert text.startswith("<|im_start|>tools\n") and '"get_weather"' in text
    assert text.endswith("<|im_start|>tool\nnot json  <|im_end|>\n<|im_start|>assistant\n")


def test_jinja_template_without_tools_support_refuses_tool_records():
    plain = CHATML_TOOLS.split("{% endif %}", 1)[1].replace("{% for call in message.get('tool_calls') or [] %}"
                                                           "{{ '<call>' + (call['function'] | tojson) }}{% endfor %}", "")
    template = resolve_template("tokenizer", _chatml_tokenizer(plain))
    with pytest.raises(UserError, match=r"has no tools support, so it cannot encode records with tools"):
        template.encode(_conversations(HANDMADE[:1]))
    assert template.encode(_conversations(HANDMADE[2:]))  # records without tools still encode
