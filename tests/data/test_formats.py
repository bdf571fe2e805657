"""Data: loading every accepted file type and record form, the Mistral template, and bad input."""

import json

import pytest

from mistral_qlora.data.formats import Conversation, parse_messages, parse_text, records_to_conversations
from mistral_qlora.data.load import read_records
from mistral_qlora.data.tokenize import IGNORE_INDEX, tokenize_conversations
from mistral_qlora.errors import UserError
from mistral_qlora.model.base import resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer

from testkit import ROOT


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("tiny-random-mistral"))


def test_sample_dataset_is_the_seed_format():
    records = json.loads((ROOT / "dataset/story.json").read_text())
    assert len(records) >= 200
    convs = records_to_conversations(records, "auto", "story.json")
    assert all(len(c) == 1 for c in convs)
    assert all(set(r) == {"text"} for r in records)


def test_tokenizer_is_the_real_mistral_v1(tokenizer):
    assert len(tokenizer) == 32000
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2


def test_template_matches_mistral_common_v1_encoder(tokenizer):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    turns = [("What is 2+2?", "It is 4."), ("And the capital of France?", "Paris, a city on the Seine.")]
    # mistral-common encodes requests that end with the user: compare everything up to the last answer.
    messages = [UserMessage(content=turns[0][0]), AssistantMessage(content=turns[0][1]),
                UserMessage(content=turns[1][0])]
    reference = MistralTokenizer.v1().encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    (example,), _ = tokenize_conversations([turns], tokenizer, max_seq_len=4096)
    last_answer = tokenizer(turns[1][1], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert example["input_ids"] == reference + last_answer
    # And the seed's text form tokenizes the same as the whole string would.
    whole = tokenizer("<s>[INST] What is 2+2? [/INST] It is 4.</s>", add_special_tokens=False)["input_ids"]
    (single,), _ = tokenize_conversations([turns[:1]], tokenizer, max_seq_len=4096)
    assert single["input_ids"] == whole


def test_labels_cover_answers_only_unless_train_on_prompt(tokenizer):
    turns = [("Question one?", "Answer one."), ("Question two?", "Answer two.")]
    (ex,), _ = tokenize_conversations([turns], tokenizer, max_seq_len=4096)
    learned = [t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE_INDEX]
    expected = []
    for _, a in turns:
        expected += tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert learned == expected
    (ex_all,), _ = tokenize_conversations([turns], tokenizer, max_seq_len=4096, train_on_prompt=True)
    assert ex_all["labels"][0] == IGNORE_INDEX  # BOS is never a target
    assert ex_all["labels"][1:] == ex_all["input_ids"][1:]


def test_overlong_records_are_truncated_or_dropped_and_counted(tokenizer):
    convs = [[("Short?", "Yes.")], [("Long " * 50 + "?", "word " * 100)], [("Prompt " * 200, "x")]]
    kept, stats = tokenize_conversations(convs, tokenizer, max_seq_len=64, overlong="truncate")
    assert (stats.truncated, stats.dropped, stats.kept) == (1, 1, 2)  # the third: prompt alone fills it
    assert all(len(ex["input_ids"]) <= 64 for ex in kept)
    kept, stats = tokenize_conversations(convs, tokenizer, max_seq_len=64, overlong="drop")
    assert (stats.truncated, stats.dropped, stats.kept) == (0, 2, 1)


def test_a_truncated_record_is_its_first_tokens_and_is_marked(tokenizer):
    """tokenize_batch keeps each record's first max_seq_len ids and labels (the ragged batch cut
    in one gather), marks the truncated ones, and keeps the order of the others."""
    from mistral_qlora.data.tokenize import tokenize_batch

    convs = [[("Short?", "Yes.")], [("Long " * 50 + "?", "word " * 100)], [("Prompt " * 200, "x")],
             [("Also short?", "No."), ("Two turns?", "Yes " * 40)]]
    whole, _ = tokenize_conversations(convs, tokenizer, max_seq_len=10_000)
    batch, stats = tokenize_batch(convs, tokenizer, max_seq_len=64)
    examples = batch.examples()
    assert stats.lengths == [len(whole[0]["input_ids"]), 64, 64]
    assert batch.truncated.tolist() == [False, True, True]
    for got, full in zip(examples, [whole[0], whole[1], whole[3]]):
        assert got["input_ids"] == full["input_ids"][:64] and got["labels"] == full["labels"][:64]


RECORDS = {
    "text": {"text": "<s>[INST] Hi? [/INST] Hello. </s>"},
    "prompt_response": {"prompt": "Hi?", "response": "Hello."},
    "instruction": {"instruction": "Hi?", "input": "", "output": "Hello."},
    "messages": {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]},
}


@pytest.mark.parametrize("form", sorted(RECORDS))
@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet", "dir"])
def test_every_form_in_every_file_type(tmp_path, form, suffix):
    import datasets

    records = [RECORDS[form]] * 3
    path = tmp_path / f"data{suffix if suffix != 'dir' else ''}"
    if suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    else:
        ds = datasets.Dataset.from_list(records)
        ds.to_parquet(str(path)) if suffix == ".parquet" else ds.save_to_disk(str(path))
    convs = records_to_conversations(read_records(path), "auto", str(path))
    assert convs == [[("Hi?", "Hello.")]] * 3


def test_instruction_input_is_merged_and_the_system_prompt_kept_apart():
    convs = records_to_conversations([{"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}], "auto", "x")
    assert convs == [[("Translate.\n\nBonjour", "Hello")]] and convs[0].system == ""
    turns = parse_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "Bye"},
                            {"role": "assistant", "content": "Ciao"}], "x")
    assert turns == Conversation([("Hi", "Hey"), ("Bye", "Ciao")], system="Be brief.")
    assert turns != Conversation([("Hi", "Hey"), ("Bye", "Ciao")])  # the system prompt is part of it
    convs = records_to_conversations([{"prompt": "Hi?", "response": "Hello.", "system": " Be brief. "},
                                      {"prompt": "Yo?", "response": "Hey."}], "auto", "x")
    assert [c.system for c in convs] == ["Be brief.", ""]
    with pytest.raises(UserError, match=r"x record 0 \(0-based\): 'system' must be a string, got int 3"):
        records_to_conversations([{"prompt": "Hi?", "response": "Hello.", "system": 3}], "auto", "x")
    assert parse_text("<s>[INST] a [/INST] b </s>[INST] c [/INST] d </s>", "x") == [("a", "b"), ("c", "d")]


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"text": "<s>[INST] a [/INST] b </s>"},\n  {"text": oops}\n]')
    with pytest.raises(UserError, match=r"broken.json:3:12: malformed JSON: Expecting value"):
        read_records(path)


def test_bad_jsonl_line_names_its_number(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "<s>[INST] a [/INST] b </s>"}\n\n{"text": \n')
    with pytest.raises(UserError, match=r"broken.jsonl:3:\d+: bad JSON line"):
        read_records(path)


@pytest.mark.parametrize("record, message", [
    ({"text": "just some prose without the template"}, r"record 1 \(0-based\): text has no '\[INST\] ... \[/INST\]' pair: 'just some"),
    ({"text": 42}, r"record 1 \(0-based\): 'text' must be a string, got int 42"),
    ({"text": "<s>[INST] question [/INST] </s>"}, r"record 1 \(0-based\): no answer after \[/INST\]"),
    ({"prompt": "q"}, r"record 1 \(0-based\): no 'text' key"),
])
def test_bad_records_name_their_index_and_a_snippet(record, message):
    records = [{"text": "<s>[INST] a [/INST] b </s>"}, record]
    with pytest.raises(UserError, match=message):
        records_to_conversations(records, "auto", "data.json")


def test_empty_and_missing_datasets(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(UserError, match="the dataset is empty"):
        records_to_conversations(read_records(tmp_path / "empty.json"), "auto", "empty.json")
    with pytest.raises(UserError, match="data file not found"):
        read_records(tmp_path / "missing.json")
    with pytest.raises(UserError, match="unsupported data file type"):
        (tmp_path / "data.csv").write_text("a,b\n")
        read_records(tmp_path / "data.csv")


def test_a_missing_field_is_named_as_missing_not_as_a_nonetype():
    records = [{"prompt": "q", "response": "a"}, {"prompt": "q"}, {"prompt": "q", "response": None}]
    for bad in records[1:]:  # the key absent, or null (what an Arrow table gives for an absent key)
        with pytest.raises(UserError, match=r"data.json record 1 \(0-based\): the 'response' field is missing or "
                                            r"null; every record needs a non-empty 'response'$"):
            records_to_conversations([records[0], bad], "prompt_response", "data.json")
