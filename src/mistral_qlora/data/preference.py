"""Preference records -> pair tokens: a prompt with a chosen and a rejected answer, each encoded as
one full sequence prompt + answer through the run's chat template.

Record forms (the `preference` form, detected from the `chosen` and `rejected` columns; a
source's `columns` maps other names onto these):
- `prompt` + `chosen` + `rejected` strings, with an optional `system` column, as SFT's
  prompt/response records;
- a `messages` context (a list of {role, content}: an optional system message, then user and
  assistant alternating, ending with the user) plus `chosen` and `rejected`, each a string, one
  assistant message {role, content} or a one-element list of one;
- `chosen` and `rejected` full conversations (message lists) that share every message but the
  last, which is an assistant message in both (the implicit prompt).

Every pair is its shared context and two answers. The context (earlier assistant turns
included) is the prompt, labelled -100; only the final answer carries labels, with the end of
its turn, exactly as SFT labels an answer. Both sequences are the template's encoding of the
conversation context + answer, so their prompt is the template's own ids; the prompt is
everything before the final answer's labelled run, and the rejected sequence reuses the chosen
one's prompt ids, so both share them exactly.

Lengths: a prompt longer than data.max_prompt_len loses its start (cut from the LEFT, the first
token kept where it is a special one, BOS), since the latest turns matter most to the answer;
then each answer is cut from the RIGHT so prompt + answer <= data.max_seq_len, and both answers
so that the pair (both sequences) fits data.tokens_per_row, the row that must hold it whole.
Where the pair still exceeds the row, the longer answer loses tokens first. With
data.overlong=drop a pair that would need any cut is left out; a pair whose prompt leaves no
room for an answer token is left out either way. Each cut is marked per pair
(`prompt_truncated`, `answer_truncated`) and counted by `prepare`.

Bad pairs are refused with one line naming the source and record: a missing `chosen` or
`rejected`, an empty answer, chosen equal to rejected (the pair would teach nothing and its
margin is zero by construction: it is refused, not dropped), implicit-prompt conversations whose
shared messages differ (naming the first that differs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mistral_qlora.data.formats import Conversation, _snippet, parse_messages, record_label
from mistral_qlora.data.templates import IGNORE_INDEX, ChatTemplate
from mistral_qlora.errors import UserError

FORM = "preference"
KEYS = ("chosen", "rejected")  # the columns that make a record a preference pair
OPTIONAL = ("prompt", "messages", "system")
# the pair table's columns: what training reads, then what `prepare` counts
PAIR_COLUMNS = ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
COUNT_COLUMNS = ("length", "truncated", "prompt_truncated", "answer_truncated", "prompt_len", "chosen_len",
                 "rejected_len")


@dataclass
class PreferencePair:
    """One record: the shared context (messages, the system one first where there is one) and the
    two final assistant messages."""

    context: list[dict]
    chosen: dict
    rejected: dict

    def conversation(self, side: str, where: str = "") -> Conversation:
        """The context followed by one answer ("chosen" or "rejected"), as a Conversation."""
        return parse_messages(self.context + [getattr(self, side)], where)

    def prompt(self, where: str = "") -> Conversation:
        """The context as a Conversation whose last answer is empty: what a model answers."""
        conv = self.conversation("chosen", where)
        messages = conv.messages[:-1] if conv.messages is not None else None
        return Conversation(list(conv[:-1]) + [(conv[-1][0], "")], conv.system, messages, conv.tools)


def _message_list(value, what: str, where: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise UserError(f"{where}: '{what}' must be a string, an assistant message {{\"role\": \"assistant\", "
                        f"\"content\": ...}} or a list of messages, got {_snippet(value)}")
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def _answer(value, what: str, where: str) -> dict:
    """A `chosen`/`rejected` answer given as a string, one assistant message or a one-element list."""
    if isinstance(value, str):
        message = {"role": "assistant", "content": value}
    else:
        messages = _message_list(value, what, where)
        if len(messages) != 1 or messages[0].get("role") != "assistant":
            raise UserError(f"{where}: '{what}' must be one assistant message (or a string) when the record has "
                            f"'prompt' or 'messages'; got {_snippet(value)}")
        message = messages[0]
    _check_answer(message, what, where)
    return message


def _check_answer(message: dict, what: str, where: str) -> None:
    content = message.get("content")
    if not message.get("tool_calls") and (not isinstance(content, str) or not content.strip()):
        raise UserError(f"{where}: the {what} answer is empty; every pair needs two non-empty answers "
                        "(fill it in or remove the record)")


def _missing(record: dict, where: str) -> None:
    for key in KEYS:
        if record.get(key) is None:
            other = KEYS[1 - KEYS.index(key)]
            raise UserError(f"{where}: the '{key}' field is missing or null; a preference record needs both "
                            f"'{other}' and '{key}' (map other column names with the source's columns)")


def parse_pair(record: dict, where: str) -> PreferencePair:
    """One record of any of the three forms as a PreferencePair, checked."""
    _missing(record, where)
    chosen, rejected = record["chosen"], record["rejected"]
    if record.get("prompt") is not None:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{where}: 'prompt' must be a non-empty string, got {_snippet(prompt)}")
        system = record.get("system")
        context = ([{"role": "system", "content": system.strip()}] if isinstance(system, str) and system.strip()
                   else []) + [{"role": "user", "content": prompt}]
        pair = PreferencePair(context, _answer(chosen, "chosen", where), _answer(rejected, "rejected", where))
    elif record.get("messages") is not None:
        context = _message_list(record["messages"], "messages", where)
        pair = PreferencePair(context, _answer(chosen, "chosen", where), _answer(rejected, "rejected", where))
    else:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise UserError(f"{where}: 'chosen' and 'rejected' are strings but the record has no 'prompt' or "
                            "'messages'; give the prompt, or give both as full conversations (message lists)")
        c, r = _message_list(chosen, "chosen", where), _message_list(rejected, "rejected", where)
        for what, msgs in (("chosen", c), ("rejected", r)):
            if not msgs or msgs[-1].get("role") != "assistant":
                raise UserError(f"{where}: the last message of '{what}' must be the assistant's answer (an implicit "
                                "prompt: chosen and rejected share every message but the last)")
        shared_c, shared_r = c[:-1], r[:-1]
        if shared_c != shared_r:
            k = next((k for k, (a, b) in enumerate(zip(shared_c, shared_r)) if a != b), min(len(shared_c), len(shared_r)))
            raise UserError(f"{where}: 'chosen' and 'rejected' must share every message but the last; they differ "
                            f"at message {k} (chosen: {_snippet(c[k] if k < len(c) else None)}, rejected: "
                            f"{_snippet(r[k] if k < len(r) else None)})")
        if not shared_c:
            raise UserError(f"{where}: 'chosen' and 'rejected' hold only the answer; the conversations need the "
                            "prompt before it (or give a 'prompt' column)")
        _check_answer(c[-1], "chosen", where)
        _check_answer(r[-1], "rejected", where)
        pair = PreferencePair(shared_c, c[-1], r[-1])
    if _same(pair.chosen, pair.rejected):
        raise UserError(f"{where}: chosen and rejected are the same answer ({_snippet(pair.chosen.get('content'))}); "
                        "a pair needs two different answers (fix the record or remove it)")
    pair.conversation("chosen", where)  # the context's roles and order, checked as SFT checks messages
    return pair


def _same(a: dict, b: dict) -> bool:
    strip = (lambda m: {**m, "content": m["content"].strip()} if isinstance(m.get("content"), str) else m)
    return strip(a) == strip(b)


def parse_pairs(records: list[dict], source: str) -> list[PreferencePair]:
    if not records:
        raise UserError(f"{source}: the dataset is empty (no records)")
    return [parse_pair(rec, f"{source} {record_label(i)}") for i, rec in enumerate(records)]


def _answer_start(labels: np.ndarray) -> int:
    """Where the final answer's labelled run starts (-1 when nothing is labelled)."""
    learned = np.flatnonzero(labels != IGNORE_INDEX)
    if not len(learned):
        return -1
    k = len(learned) - 1
    while k > 0 and learned[k - 1] == learned[k] - 1:
        k -= 1
    return int(learned[k])


def _caps(ac: int, ar: int, room: int) -> tuple[int, int]:
    """The answers' lengths cut so they sum to at most `room`: the longer one cut first, down to
    an equal share (the largest cap c with min(ac, c) + min(ar, c) <= room)."""
    if ac + ar <= room:
        return ac, ar
    short = min(ac, ar)
    cap = room - short if 2 * short <= room else room // 2
    return min(ac, cap), min(ar, cap)


class PairEncoder:
    """Pairs -> the pair table's columns, through a chat template, with the length rules above."""

    def __init__(self, template: ChatTemplate, max_seq_len: int, max_prompt_len: int | None, overlong: str,
                 tokens_per_row: int):
        self.template = template
        self.max_seq_len = max_seq_len
        self.max_prompt_len = max_prompt_len
        self.overlong = overlong
        self.tokens_per_row = tokens_per_row
        self.special = set(getattr(template.tokenizer, "all_special_ids", ()) or ())

    def _prompt(self, prompt: np.ndarray) -> tuple[np.ndarray, bool]:
        limit = self.max_prompt_len
        if limit is None or len(prompt) <= limit:
            return prompt, False
        keep_first = int(prompt[0]) in self.special and limit > 1
        tail = prompt[len(prompt) - (limit - 1 if keep_first else limit):]
        return (np.concatenate([prompt[:1], tail]) if keep_first else tail), True

    def encode(self, pairs: list[PreferencePair], wheres: list[str]) -> dict:
        """The kept pairs' columns (PAIR_COLUMNS + COUNT_COLUMNS) as Python lists, in order."""
        convs = [p.conversation(side, w) for p, w in zip(pairs, wheres) for side in ("chosen", "rejected")]
        ids, labels = self.template.encode_ragged(convs, False)
        out = {c: [] for c in (*PAIR_COLUMNS, *COUNT_COLUMNS)}
        for k, where in enumerate(wheres):
            seqs = []
            for side in (0, 1):
                i = 2 * k + side
                lo, hi = int(ids.offsets[i]), int(ids.offsets[i + 1])
                seq_ids, seq_labels = ids.values[lo:hi], labels.values[lo:hi]
                start = _answer_start(seq_labels)
                if start <= 0:
                    raise UserError(f"{where}: the {('chosen', 'rejected')[side]} answer gives no token to learn "
                                    f"through data.template={self.template.name}; fill it in or remove the record")
                seqs.append((seq_ids, seq_labels, start))
            prompt, prompt_cut = self._prompt(seqs[0][0][:seqs[0][2]])
            answers = [(s_ids[start:], s_labels[start:]) for s_ids, s_labels, start in seqs]
            ac, ar = len(answers[0][0]), len(answers[1][0])
            p = len(prompt)
            room_seq = self.max_seq_len - p
            room_row = self.tokens_per_row - 2 * p
            if room_seq < 1 or room_row < 2 or (self.overlong == "drop" and prompt_cut):
                continue  # no room for an answer, or a cut prompt where cuts drop the pair
            cc, cr = _caps(min(ac, room_seq), min(ar, room_seq), room_row)
            answer_cut = (cc, cr) != (ac, ar)
            if answer_cut and self.overlong == "drop":
                continue
            prompt_labels = np.full(p, IGNORE_INDEX, dtype=prompt.dtype)
            lengths = []
            for (a_ids, a_labels), n, side in zip(answers, (cc, cr), ("chosen", "rejected")):
                out[f"{side}_ids"].append(np.concatenate([prompt, a_ids[:n]]).tolist())
                out[f"{side}_labels"].append(np.concatenate([prompt_labels, a_labels[:n]]).tolist())
                lengths.append(p + n)
            out["length"].append(sum(lengths))
            out["truncated"].append(prompt_cut or answer_cut)
            out["prompt_truncated"].append(prompt_cut)
            out["answer_truncated"].append(answer_cut)
            out["prompt_len"].append(p)
            out["chosen_len"].append(cc)
            out["rejected_len"].append(cr)
        return out


def features():
    from datasets import Features, Sequence, Value

    ids = Sequence(Value("int32"))
    return Features({**{c: ids for c in PAIR_COLUMNS}, "length": Value("int32"), "truncated": Value("bool"),
                     "prompt_truncated": Value("bool"), "answer_truncated": Value("bool"),
                     "prompt_len": Value("int32"), "chosen_len": Value("int32"), "rejected_len": Value("int32")})


def drop_reason(overlong: str) -> str:
    """Why `prepare` says pairs were left out: the only ways a checked pair is dropped."""
    if overlong == "drop":
        return ("a cut was needed (prompt over data.max_prompt_len, or a sequence over data.max_seq_len, or the "
                "pair over data.tokens_per_row) and data.overlong=drop")
    return "the prompt leaves no room for an answer within data.max_seq_len / data.tokens_per_row (set data.max_prompt_len)"
