"""Raw documents (data.format: raw): BOS + text + EOS with the loss on every token, long documents
split into chunks that lose no token, `.txt` files, raw mixed with chat by weight, the stream's
resume, and bad input in one line."""

import json

import pytest

from mistral_qlora.cli import main
from mistral_qlora.config import load_config
from mistral_qlora.data import build_data
from mistral_qlora.data.formats import records_to_conversations
from mistral_qlora.data.raw import RawEncoder, tokenize_raw
from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.errors import UserError

from testkit import ROOT, story_records, tiny_path

# prose and code: runs of spaces, newlines, tabs, punctuation, digits, non-ASCII
DOCS = [
    "The quick brown fox jumps over the lazy dog.  Twice:  again.\n\nA new paragraph, café naïve.",
    "def add(x, y):\n    return x + y\n\n\tprint(add(2, 3))  # 5\n",
    "Résumé: 1.5 kg of flour, 3 eggs; bake at 180 °C for 25 minutes.",
]


@pytest.fixture(scope="module")
def tok():
    from mistral_qlora.model.tokenizer import load_tokenizer

    return load_tokenizer(tiny_path())


def _doc(n_words: int, seed: int) -> str:
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north", "seven", "cloud"]
    return " ".join(words[(i * 7 + seed) % len(words)] + ("." if i % 9 == 8 else "") for i in range(n_words))


def _cfg(tmp_path, train, *sets):
    return load_config(None, [f"data.train={train}", f"data.cache_dir={tmp_path / 'cache'}", "data.max_seq_len=64",
                              "data.tokens_per_row=64", *sets])


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_a_document_is_bos_text_eos_with_every_token_but_the_first_a_target(tok):
    encoder = RawEncoder(tok)
    assert encoder.encoder is not None  # the tiny model's Mistral SentencePiece file: the templates' fast path
    batch, stats = tokenize_raw(DOCS, encoder, max_seq_len=4096, overlong="split")
    for doc, ids, labels in zip(DOCS, batch.ids.lists(), batch.labels.lists()):
        assert ids == [tok.bos_token_id, *tok(doc, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        assert labels == [IGNORE_INDEX, *ids[1:]]
    assert stats.records == 3 and stats.kept == 3 and not stats.truncated and not stats.dropped
    # without SentencePiece's file the tokenizer itself encodes: the same ids
    encoder.encoder = None
    again, _ = tokenize_raw(DOCS, encoder, max_seq_len=4096, overlong="split")
    assert again.ids.lists() == batch.ids.lists()


def test_overlong_documents_are_split_truncated_or_dropped(tok):
    docs = [_doc(300, 1), "short text", _doc(120, 2)]
    whole, _ = tokenize_raw(docs, RawEncoder(tok), max_seq_len=10_000, overlong="split")
    full = whole.ids.lists()
    split, stats = tokenize_raw(docs, RawEncoder(tok), max_seq_len=50, overlong="split")
    chunks = split.ids.lists()
    assert stats.records == 3 and stats.kept == len(chunks) > 3 and not stats.truncated and not stats.dropped
    assert all(len(c) <= 50 for c in chunks)
    assert [t for c in chunks for t in c] == [t for d in full for t in d]  # every token, in order
    assert all(lab == [IGNORE_INDEX, *c[1:]] for c, lab in zip(chunks, split.labels.lists()))
    cut, stats = tokenize_raw(docs, RawEncoder(tok), max_seq_len=50, overlong="truncate")
    assert cut.ids.lists() == [full[0][:50], full[1], full[2][:50]] and stats.truncated == 2
    assert cut.truncated.tolist() == [True, False, True]
    kept, stats = tokenize_raw(docs, RawEncoder(tok), max_seq_len=50, overlong="drop")
    assert kept.ids.lists() == [full[1]] and stats.dropped == 2


def test_split_chunks_through_the_cache_are_the_documents_ids(tmp_path, tok):
    docs = [_doc(700, 3), _doc(40, 4), _doc(260, 5)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    data = build_data(_cfg(tmp_path, f"[{{path: {path}, format: raw}}]", "data.eval_fraction=0").data, tok, seed=1)
    assert data.sources[0].form == "raw" and data.sources[0].records == 3
    chunks = data.train["input_ids"][:]
    assert len(chunks) == data.sources[0].kept > 3 and all(len(c) <= 64 for c in chunks)
    want = [t for d in RawEncoder(tok).encode_ragged(docs).lists() for t in d]
    assert [t for c in chunks for t in c] == want  # one source: its rows in order, the documents' ids
    assert data.answer_tokens() == len(want) - len(chunks)  # every token a target but each chunk's first
    assert all(sum(len(chunks[i]) for i in row) <= 64 for row in data.packed_rows)


def test_auto_never_reads_text_records_as_raw(tmp_path, tok):
    story = records_to_conversations(story_records(3), "auto", "story")
    assert [list(c) for c in story][0][0][0].startswith("What do plants")  # the [INST] form, not a document
    with pytest.raises(UserError, match="set data.format: raw"):
        records_to_conversations([{"text": "A plain document."}], "auto", "docs")
    raw = records_to_conversations(story_records(1), "raw", "story")
    assert raw == [story_records(1)[0]["text"]]  # chosen raw, the text is the document as it is


def test_txt_files_are_raw_documents_one_each(tmp_path, tok):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i}.txt").write_text(d)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    from_txt = build_data(_cfg(tmp_path, f"{folder}/*.txt", "data.eval_fraction=0").data, tok, seed=1)
    from_jsonl = build_data(_cfg(tmp_path, f"[{{path: {tmp_path / 'docs.jsonl'}, format: raw}}]",
                                 "data.eval_fraction=0").data, tok, seed=1)
    assert from_txt.sources[0].form == "raw" and from_txt.sources[0].records == 3
    assert from_txt.train["input_ids"][:] == from_jsonl.train["input_ids"][:]


def test_prepare_reports_documents_chunks_and_tokens_of_raw_mixed_with_chat(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": _doc(150 + 20 * i, i)}) + "\n" for i in range(20)))
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(story_records(40)))
    code, out, err = _cli(capsys, "prepare", str(ROOT / "configs/tiny.yaml"), "--set",
                          f"data.train=[{{path: {docs}, format: raw, weight: 1}}, {{path: {chat}, weight: 1}}]",
                          "--set", "data.overlong=auto", "--set", "data.max_seq_len=64", "--set",
                          "data.tokens_per_row=64", "--set", "data.mix=all_exhausted",
                          "--set", f"data.cache_dir={tmp_path / 'c'}")
    assert code == 0, err
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if line.startswith("  /")}
    assert "18 documents read, " in lines[str(docs)] and " chunks, " in lines[str(docs)]
    chunks = int(lines[str(docs)].split(" documents read, ")[1].split(" chunks")[0].replace(",", ""))
    assert chunks > 18 * 2  # every document longer than 64 tokens: split
    assert "36 records read, 36 kept" in lines[str(chat)]
    assert "answers only of chat records, every token of raw documents" in out


def test_the_stream_of_raw_documents_resumes_at_any_row(tmp_path, tok):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": _doc(30 + 25 * (i % 5), i)}) + "\n" for i in range(30)))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in story_records(20)))

    def stream():
        cfg = _cfg(tmp_path, f"[{{path: {docs}, format: raw, weight: 2}}, {{path: {chat}}}]", "data.streaming=true",
                   "data.eval_fraction=0", "data.stream_buffer=8", "train.max_steps=1")
        return build_data(cfg.data, tok, seed=3).stream

    first = list(stream())
    assert any(len(ex["input_ids"]) == 64 for row in first for ex in row)  # split chunks in the rows
    stats, per_source, _ = stream().scan()
    assert per_source[0][1] > per_source[0][0] and stats.dropped == 0  # more chunks than documents, none dropped
    for at in (2, len(first) // 2, len(first) - 1):
        fresh = stream()
        it = iter(fresh)
        for _ in range(at + 1):
            next(it)
        position = json.loads(json.dumps(fresh.position_at(at)))  # as a checkpoint stores it
        resumed = stream()
        resumed.resume(position)
        assert list(resumed) == first[at:], at


# -- bad input: one line, exit 2 ----------------------------------------------------------------

def _bad(capsys, tmp_path, *sets) -> str:
    args = ["prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.cache_dir={tmp_path / 'c'}"]
    for s in sets:
        args += ["--set", s]
    code, _, err = _cli(capsys, *args)
    lines = [line for line in err.splitlines() if line.startswith("mistral-qlora: error: ")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("bad", [{"text": "  \n"}, {"text": None}, {"body": "x"}])
def test_a_raw_record_without_text_names_the_record(tmp_path, capsys, bad):
    path = tmp_path / "docs.jsonl"
    records = [{"text": "One document."}, {"text": "Two."}, bad, {"text": "Four."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    err = _bad(capsys, tmp_path, f"data.train=[{{path: {path}, format: raw}}]", "data.eval_fraction=0")
    assert f"{path} record 2 (0-based): the 'text' field is missing, null or empty" in err


def test_raw_on_a_file_without_a_text_column_names_the_file_and_its_columns(tmp_path, capsys):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q?", "answer": "a."}) + "\n")
    err = _bad(capsys, tmp_path, f"data.train={path}", "data.format=raw")
    assert f"{path}: format raw needs the column(s) text; its columns: question, answer" in err


def test_split_is_refused_for_chat_records_and_an_empty_txt_file_is_named(tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps(story_records(4)))
    err = _bad(capsys, tmp_path, f"data.train={chat}", "data.overlong=split")
    assert f"{chat}: data.overlong=split cuts raw documents into chunks" in err
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "b.txt").write_text("")
    err = _bad(capsys, tmp_path, f"data.train={tmp_path}/*.txt")
    assert f"{tmp_path / 'b.txt'}: the text file is empty" in err
