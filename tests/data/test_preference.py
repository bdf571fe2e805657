"""Preference pairs (data/preference.py, the preference side of build_data and prepare): the three
record forms, the template's ids, the length rules, bad input, packing of whole pairs."""

import json

import pytest

from mistral_qlora.cli import main
from mistral_qlora.config import DataSection, DataSource
from mistral_qlora.data.dataset import build_data
from mistral_qlora.data.formats import Conversation
from mistral_qlora.data.preference import PairEncoder, parse_pairs
from mistral_qlora.data.templates import IGNORE_INDEX, resolve_template
from mistral_qlora.errors import UserError
from mistral_qlora.model.tokenizer import load_tokenizer, write_mistral_tokenizer

from testkit import ROOT

SYSTEM = "Answer briefly."
CONTEXT = [{"role": "user", "content": "Hello there."}, {"role": "assistant", "content": "Hi! How can I help?"},
           {"role": "user", "content": "What is the capital of France?"}]
CHOSEN, REJECTED = "Paris is the capital of France.", "I would rather not say."


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("v3")
    write_mistral_tokenizer(folder, "v3")
    return load_tokenizer(str(folder))


def _encoder(tok, name="auto", max_seq_len=512, max_prompt_len=None, overlong="truncate", tokens_per_row=1024):
    return PairEncoder(resolve_template(name, tok), max_seq_len, max_prompt_len, overlong, tokens_per_row)


def _encode(encoder, records):
    pairs = parse_pairs(records, "pairs.jsonl")
    return encoder.encode(pairs, [f"pairs.jsonl record {i}" for i in range(len(pairs))])


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _cfg(tmp_path, train, **kw):
    return DataSection(train=train, cache_dir=str(tmp_path / "cache"), num_proc=1, **kw)


def test_the_three_record_forms_give_the_same_pair(tok):
    """messages context + chosen as a string, an assistant message or a one-element list, and the
    implicit prompt (two full conversations) all encode to the same pair."""
    system = [{"role": "system", "content": SYSTEM}]
    answer = (lambda text: {"role": "assistant", "content": text})
    records = [
        {"messages": system + CONTEXT, "chosen": CHOSEN, "rejected": REJECTED},
        {"messages": system + CONTEXT, "chosen": answer(CHOSEN), "rejected": [answer(REJECTED)]},
        {"chosen": system + CONTEXT + [answer(CHOSEN)], "rejected": system + CONTEXT + [answer(REJECTED)]},
    ]
    out = _encode(_encoder(tok), records)
    for col in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
        assert out[col][0] == out[col][1] == out[col][2]
    # the prompt form with its system column is the one-turn case of the same thing
    one = _encode(_encoder(tok), [{"prompt": "Name a colour.", "system": SYSTEM, "chosen": "Blue.", "rejected": "No."},
                                  {"messages": system + [{"role": "user", "content": "Name a colour."}],
                                   "chosen": "Blue.", "rejected": "No."}])
    assert one["chosen_ids"][0] == one["chosen_ids"][1] and one["rejected_ids"][0] == one["rejected_ids"][1]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_pair_ids_are_the_sft_encoding_with_labels_on_the_final_answer_only(version, tok, v3):
    """Each sequence is the template's encoding of context + answer (the SFT encoder's ids); the
    labels keep only the final answer and its end of turn, earlier assistant turns are prompt."""
    tokenizer = {"v1": tok, "v3": v3}[version]
    template = resolve_template("auto", tokenizer)
    assert template.name == f"mistral-{version}"
    out = _encode(_encoder(tokenizer), [{"messages": CONTEXT, "chosen": CHOSEN, "rejected": REJECTED},
                                        {"prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."}])
    turns = [("Hello there.", "Hi! How can I help?"), ("What is the capital of France?", CHOSEN)]
    (ids, labels), = template.encode([Conversation(turns)])
    assert out["chosen_ids"][0] == ids
    answer = template.encode([Conversation([("Q", CHOSEN)])])[0][0]
    n = len(answer) - len(template.generation_ids(Conversation([("Q", "")])))  # the answer and its end of turn
    assert out["chosen_labels"][0] == [IGNORE_INDEX] * (len(ids) - n) + labels[-n:]
    assert labels[-1] == tokenizer.eos_token_id and out["chosen_labels"][0][-1] == tokenizer.eos_token_id
    (ids1, labels1), = template.encode([Conversation([("Two plus two?", "Four.")])])
    assert out["chosen_ids"][1] == ids1 and out["chosen_labels"][1] == labels1
    p = out["prompt_len"][1]
    assert out["rejected_ids"][1][:p] == ids1[:p]  # the same prompt ids
    assert tokenizer.decode(out["rejected_ids"][1][p:], skip_special_tokens=True).strip() == "Five."


def test_long_prompt_is_cut_from_the_left_keeping_bos_and_answers_from_the_right(tok):
    prompt = " ".join(f"word{i}" for i in range(60)) + " final question?"
    full = _encode(_encoder(tok), [{"prompt": prompt, "chosen": CHOSEN * 3, "rejected": REJECTED}])
    p_full = full["prompt_len"][0]
    out = _encode(_encoder(tok, max_prompt_len=20, max_seq_len=30),
                  [{"prompt": prompt, "chosen": CHOSEN * 3, "rejected": REJECTED}])
    ids, labels = out["chosen_ids"][0], out["chosen_labels"][0]
    assert out["prompt_len"][0] == 20 and out["prompt_truncated"] == [True]
    assert ids[0] == tok.bos_token_id and ids[1:20] == full["chosen_ids"][0][p_full - 19:p_full]  # the prompt's end
    assert len(ids) == 30 and out["answer_truncated"] == [True] and out["truncated"] == [True]
    assert ids[20:] == full["chosen_ids"][0][p_full:p_full + 10]  # the answer's start
    assert all(lab == IGNORE_INDEX for lab in labels[:20]) and labels[20:] == ids[20:]
    assert out["rejected_ids"][0][:20] == ids[:20]
    assert out["length"] == [len(ids) + len(out["rejected_ids"][0])]
    # data.overlong=drop leaves the pair out instead
    assert _encode(_encoder(tok, max_prompt_len=20, max_seq_len=30, overlong="drop"),
                   [{"prompt": prompt, "chosen": CHOSEN, "rejected": REJECTED}])["length"] == []


def test_a_pair_must_fit_the_row_whole_the_longer_answer_cut_first(tok):
    record = {"prompt": "Q?", "chosen": " ".join(["long answer"] * 20), "rejected": "Short."}
    free = _encode(_encoder(tok), [record])
    p, rejected = free["prompt_len"][0], free["rejected_len"][0]
    budget = 2 * p + rejected + 5
    out = _encode(_encoder(tok, tokens_per_row=budget), [record])
    assert out["length"] == [budget] and out["rejected_len"] == [rejected] and out["chosen_len"] == [5]
    assert out["answer_truncated"] == [True] and out["prompt_truncated"] == [False]
    assert _encode(_encoder(tok, tokens_per_row=budget, overlong="drop"), [record])["length"] == []
    # a prompt that leaves no room for an answer token in the row: dropped even when truncating
    assert _encode(_encoder(tok, tokens_per_row=2 * p + 1), [record])["length"] == []


BAD = [
    ({"prompt": "Q?", "chosen": "Same answer.", "rejected": " Same answer. "}, "chosen and rejected are the same answer"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": None}, "the 'rejected' field is missing or null"),
    ({"prompt": "Q?", "chosen": "  ", "rejected": "B."}, "the chosen answer is empty"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "user", "content": "Other Q?"}, {"role": "assistant", "content": "B."}]},
     "they differ at message 0"),
]


@pytest.mark.parametrize("bad,message", BAD, ids=["same", "missing", "empty", "shared-differ"])
def test_bad_pair_is_refused_naming_file_and_record(tmp_path, tok, bad, message):
    good = {"prompt": "Q?", "chosen": "A.", "rejected": "B."}
    if "prompt" not in bad:
        good = {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]}
    path = _jsonl(tmp_path / "pairs.jsonl", [good, good, good, bad, good])
    with pytest.raises(UserError) as info:
        build_data(_cfg(tmp_path, str(path), eval_fraction=0), tok, 0)
    text = str(info.value)
    assert text.startswith(f"{path} record 3 (0-based): ") and message in text and "\n" not in text


def test_missing_rejected_column_and_cli_exit_2_with_nothing_written(tmp_path, capsys):
    path = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Q?", "chosen": "A."}] * 3)
    with pytest.raises(SystemExit) as info:
        main(["prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={path}",
              "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", f"output_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert f"{path}: record 0 (0-based) has 'chosen' but no 'rejected'" in err
    assert not (tmp_path / "out").exists() and not list((tmp_path / "cache").glob("tokens-*"))


def test_columns_mapping_weights_and_whole_pairs_in_rows(tmp_path, tok):
    """Two sources (one with its own column names) mixed by weight; every packed row holds whole
    pairs within the row budget, each pair in exactly one row, chosen before rejected."""
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"Question {i}?", "chosen": f"Answer {i} " * (1 + i % 7),
                                       "rejected": f"Wrong {i}."} for i in range(40)])
    b = _jsonl(tmp_path / "b.jsonl", [{"question": f"Other {i}?", "good": "Yes, indeed.", "bad": "No " * (1 + i % 5)}
                                      for i in range(20)])
    sources = [DataSource(path=str(a), weight=2), DataSource(path=str(b), weight=1,
                                                             columns={"prompt": "question", "chosen": "good",
                                                                      "rejected": "bad"})]
    cfg = _cfg(tmp_path, sources, tokens_per_row=96, max_seq_len=48, eval_fraction=0.1, mix="all_exhausted")
    data = build_data(cfg, tok, 0, n_samples=2)
    assert data.preference and data.eval is not None and len(data.eval) == 4 + 2
    assert [s.drawn_records for s in data.sources] == [36, 18]  # all_exhausted: every held-in pair drawn
    seen = sorted(j for row in data.packed_rows for j in row)
    assert seen == list(range(len(data.train)))
    lengths = data.train_stats.lengths
    assert all(sum(lengths[j] for j in row) <= 96 for row in data.packed_rows)
    assert any(len(row) > 1 for row in data.packed_rows)
    item = data.train_dataset()[0]
    assert [r["pair"] for r in item] == [j for j in data.packed_rows[0] for _ in (0, 1)]
    for k, j in enumerate(data.packed_rows[0]):
        assert item[2 * k]["input_ids"] == data.train[j]["chosen_ids"]
        assert item[2 * k + 1]["input_ids"] == data.train[j]["rejected_ids"]
    prompt, chosen, rejected = data.sample_pairs[0]
    assert isinstance(prompt, Conversation) and prompt[-1][1] == "" and chosen != rejected
    texts = {tok.decode(data.train[j]["chosen_ids"]) for j in range(len(data.train))}
    assert any("Other" in t and "Yes, indeed." in t for t in texts)  # the mapped columns were read
    unpacked = build_data(_cfg(tmp_path, sources, tokens_per_row=96, max_seq_len=48, packing=False), tok, 0)
    assert unpacked.packed_rows == [[j] for j in range(len(unpacked.train))]


def test_preference_and_sft_sources_are_refused_together_and_the_digest_differs(tmp_path, tok):
    records = [{"prompt": f"Q{i}?", "response": f"A{i}.", "chosen": f"A{i}.", "rejected": f"B{i}."} for i in range(6)]
    both = _jsonl(tmp_path / "both.jsonl", records)
    sft = build_data(_cfg(tmp_path, str(both), format="prompt_response"), tok, 0)
    pairs = build_data(_cfg(tmp_path, str(both)), tok, 0)  # auto: chosen + rejected make it pairs
    assert pairs.preference and not sft.preference and pairs.digest != sft.digest
    mixed = [DataSource(path=str(both)), DataSource(path=str(both), format="prompt_response")]
    with pytest.raises(UserError, match=r"preference pairs \(chosen/rejected\) and SFT records .* in one run"):
        build_data(_cfg(tmp_path, mixed), tok, 0)


def test_prepare_reports_pairs_lengths_cuts_and_packing(tmp_path, capsys):
    path = _jsonl(tmp_path / "pairs.jsonl",
                  [{"prompt": "Tell me about " + "the sea " * (3 + i % 20), "chosen": "It is wide " * (1 + i % 9),
                    "rejected": "No idea."} for i in range(30)])
    with pytest.raises(SystemExit) as info:
        main(["prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={path}",
              "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "data.max_prompt_len=24",
              "--set", "data.max_seq_len=40", "--set", "data.tokens_per_row=128"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert "pairs read: 27 train, 3 eval" in out and "pairs kept: 27 train, 3 eval; dropped: 0" in out
    cuts = __import__("re").search(r"prompt cut from the left in (\d+) pairs, answers cut from the right in (\d+)", out)
    assert int(cuts.group(1)) > 0 and int(cuts.group(2)) > 0
    assert "prompt length: min" in out and "max 24," in out.split("prompt length:")[1].splitlines()[0]
    assert "chosen answer length:" in out and "rejected answer length:" in out
    assert "whole pairs packed, efficiency" in out


def test_shipped_story_pairs_are_what_the_tool_makes():
    from mistral_qlora.tools.story_pairs import story_pairs_jsonl

    shipped = (ROOT / "dataset/story_pairs.jsonl").read_text()
    assert shipped == story_pairs_jsonl(ROOT / "dataset/story.json")
    rows = [json.loads(line) for line in shipped.splitlines()]
    assert all(r["chosen"] != r["rejected"] for r in rows)
