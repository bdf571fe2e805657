"""data/spm.py: the Mistral templates tokenize with SentencePiece on the tokenizer's own model
file, mistral-common's encoder, where the tokenizer's vocabulary is exactly that file's; with the
tokenizer everywhere else."""

import json
import pickle
from pathlib import Path

import pytest

from mistral_qlora.data import spm
from mistral_qlora.data.formats import Conversation
from mistral_qlora.bench.synthetic import qa_records
from mistral_qlora.data.templates import resolve_template
from mistral_qlora.model.base import resolve_model_path
from mistral_qlora.model.tokenizer import load_tokenizer, write_mistral_tokenizer

from testkit.mistral_reference import chat_request, mistral_common_tokenizer

REPO = Path(__file__).resolve().parents[2]
# Text where conversions of a SentencePiece model can differ: runs of spaces, tabs and newlines,
# digits, accents, CJK and emoji (byte fallback), control characters, the templates' own text.
HARD = ["  two leading", "trailing  ", "a  b   c    d", " \n\nnew\nline\t tab\t\t", "x\r\ny", "1234567 3.14 -0.5e10",
        "naïve café Ærø", "日本語のテキスト", "🦙 emoji 👍🏽", "[INST] q [/INST]", "[INST]q[/INST]", "ÿ\x01\x7f",
        "tab\tsep", "end with newline\n", "   indented\n    code()"]


def _tokenizer(version, tmp_path):
    if version == "v1":
        return load_tokenizer(resolve_model_path("tiny-random-mistral"))
    write_mistral_tokenizer(tmp_path, "v3")
    return load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_the_templates_encode_as_mistral_common_on_hard_text(tmp_path, version):
    tok = _tokenizer(version, tmp_path)
    template = resolve_template(f"mistral-{version}", tok)
    assert template.encoder is not None
    mc = mistral_common_tokenizer(version, finetuning=True)
    convs = [Conversation([(f"{a} {b}", f"{b}{a}")]) for a, b in zip(HARD, HARD[::-1])]
    convs.append(Conversation([(HARD[2], HARD[3]), (HARD[0], HARD[-1])], system=HARD[4]))
    for conv, (ids, _) in zip(convs, template.encode(convs)):
        assert ids == mc.encode_chat_completion(chat_request(conv)).tokens, conv
    # a pickled copy (a data worker's) loads the model itself and encodes the same
    copy = pickle.loads(pickle.dumps(template))
    assert copy.encoder._processor is None
    assert copy.encode(convs) == template.encode(convs)


def test_sentencepiece_and_the_v1_tokenizer_give_the_same_ids():
    """For the v1 vocabulary transformers' tokenizer agrees with SentencePiece (so runs prepared
    before the templates used SentencePiece have the same tokens)."""
    tok = _tokenizer("v1", None)
    story = json.loads((REPO / "dataset" / "story.json").read_text())
    texts = [json.dumps(r, ensure_ascii=False) for r in story[:200]] + HARD
    texts += [r["prompt"] + "\n\n" + r["response"] for r in qa_records(200, seed=3)]
    assert spm.spm_encoder(tok).encode(texts) == spm.tokenizer_ids(tok, texts)


def test_a_tokenizer_with_added_tokens_keeps_its_own_encoder():
    tok = load_tokenizer(resolve_model_path("tiny-random-mistral"))
    tok.add_tokens(["qwertyzz"])  # one id to the tokenizer, several pieces to SentencePiece
    assert spm.spm_encoder(tok) is None
    template = resolve_template("mistral-v1", tok)
    assert template.encoder is None
    (ids, _), = template.encode([[("say qwertyzz", "qwertyzz")]])
    assert tok.convert_tokens_to_ids("qwertyzz") in ids


def test_a_tokenizer_without_a_model_file_keeps_its_own_encoder():
    tok = load_tokenizer(resolve_model_path("tiny-random-mistral"))
    tok.vocab_file = None
    assert spm.spm_encoder(tok) is None


def test_one_thread_where_tokenizer_parallelism_is_off(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    assert spm._threads() == 1
    monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    assert spm._threads() >= 1


def _fuzz(n, seed):
    import random

    rng = random.Random(seed)
    alphabet = list("  ab.,1\n\t\u2581é日🦙") + ["the", "The", "▁▁", "   "]
    return [("".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 12)))) for _ in range(n)]


@pytest.mark.parametrize("version", ["v1", "v3"])
def test_word_by_word_gives_sentencepiece_ids_of_the_whole_text(tmp_path, version, monkeypatch):
    """The word cache (spm.py) returns exactly SentencePiece's ids on each whole text: on hard
    text, a textbook, English-like prose and random strings of spaces, escapes and words; also
    when the cache starts over in the middle of a batch stream."""
    from mistral_qlora.bench.synthetic import prose_records

    tok = _tokenizer(version, tmp_path)
    enc = spm.spm_encoder(tok)
    assert enc.by_word
    story = json.loads((REPO / "dataset" / "story.json").read_text())
    texts = HARD + ["", " ", "  ", "a ", " a", "x" * 300] + [json.dumps(r, ensure_ascii=False) for r in story[:100]]
    texts += [r["response"] for r in prose_records(60, enc.model_file, seed=2)] + _fuzz(3000, seed=version == "v3")
    assert enc.encode(texts) == enc.processor.encode(texts)
    monkeypatch.setattr(spm, "CACHED_WORDS", 50)
    fresh = spm.SpmEncoder(enc.model_file, by_word=True)
    got = [ids for i in range(0, len(texts), 37) for ids in fresh.encode(texts[i:i + 37])]
    assert got == enc.processor.encode(texts)
    assert len(fresh._index) <= 50 + 37 * 40  # started over: bounded by the limit and one batch's words


def test_models_a_text_cannot_be_split_into_words_for_are_encoded_whole(tmp_path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    model_file = load_tokenizer(resolve_model_path("tiny-random-mistral")).vocab_file
    proto = Path(model_file).read_bytes()
    assert spm.splits_at_words(proto)

    def changed(edit):
        m = pb.ModelProto()
        m.ParseFromString(proto)
        edit(m)
        return m.SerializeToString()

    def join_words(m):
        p = m.pieces.add()
        p.piece, p.score = "a\u2581b", -1e9  # a piece across a word boundary

    assert not spm.splits_at_words(changed(join_words))
    assert not spm.splits_at_words(changed(lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True)))
    assert not spm.splits_at_words(changed(lambda m: setattr(m.normalizer_spec, "name", "nmt_nfkc")))
    assert not spm.splits_at_words(changed(lambda m: setattr(m.trainer_spec, "model_type", pb.TrainerSpec.UNIGRAM)))
    # such a model is still SentencePiece's to encode, text by text
    path = tmp_path / "joined.model"
    path.write_bytes(changed(join_words))
    whole = spm.SpmEncoder(str(path), by_word=False)
    assert whole.encode(["a b", "x"]) == whole.processor.encode(["a b", "x"])
