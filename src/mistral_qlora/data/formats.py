"""Turn records of any accepted form into conversations: (prompt, answer) turns and a system prompt.

Forms (`data.format`, detected from the first record's keys when `auto`):
- `text`: the sample's (dataset/story.json) `<s>[INST] question [/INST] answer </s>` (turns may be chained);
- `prompt_response`: `prompt` + `response` columns;
- `instruction`: `instruction` (+ optional `input`) + `output` columns;
- `messages`: a list of `{"role", "content"}` (an optional system message, then alternating
  user/assistant, ending with the assistant).
The first three take an optional `system` column; `messages` takes its system message. The chat
template (`templates.py`) decides where the system prompt goes; this module only extracts text.
- `raw`: a document in a `text` column (or a `.txt` file), no conversation: `raw_text` checks it and
  raw.py tokenizes it. Only chosen (data.format or a source's format), never detected: a `text`
  column holds the sample's `[INST]` form under `auto`.
"""

from __future__ import annotations

import re

from mistral_qlora.errors import UserError

Turn = tuple[str, str]  # (user prompt, assistant answer)


class Conversation(list):
    """A list of (user prompt, assistant answer) turns, with the conversation's system prompt as
    `system` ("" when it has none). A plain list of turns works wherever a Conversation does."""

    def __init__(self, turns=(), system: str = ""):
        super().__init__(turns)
        self.system = system

    def __eq__(self, other):
        return list.__eq__(self, other) and self.system == getattr(other, "system", "")

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def __repr__(self) -> str:
        return f"Conversation({list.__repr__(self)}, system={self.system!r})"

_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?:</s>|(?=\[INST\])|\Z)", re.DOTALL)

FORM_KEYS = {
    "text": ("text",),
    "messages": ("messages",),
    "prompt_response": ("prompt", "response"),
    "instruction": ("instruction", "output"),
    "raw": ("text",),
}
# Columns a form reads when present.
OPTIONAL_KEYS = {
    "text": ("system",),
    "messages": (),
    "prompt_response": ("system",),
    "instruction": ("input", "system"),
    "raw": (),
}


def _snippet(value, width: int = 60) -> str:
    s = " ".join((value if isinstance(value, str) else repr(value)).split())
    s = s if len(s) <= width else s[: width - 3] + "..."
    return repr(s) if isinstance(value, str) else s


def detect_format(record: dict, source: str) -> str:
    for form, keys in (("messages", FORM_KEYS["messages"]), ("text", FORM_KEYS["text"]),
                       ("prompt_response", FORM_KEYS["prompt_response"]), ("instruction", FORM_KEYS["instruction"])):
        if all(k in record for k in keys):
            return form
    raise UserError(
        f"{source}: {record_label(0)} has keys {sorted(record)}; expected 'text', 'messages', "
        "'prompt'+'response' or 'instruction'+'output' (see dataset/README.md)"
    )


def parse_text(text, where: str) -> list[Turn]:
    if not isinstance(text, str):
        raise UserError(f"{where}: 'text' must be a string, got {type(text).__name__} {_snippet(text)}")
    body = text.strip()
    body = body.removeprefix("<s>")
    turns = []
    for m in _TURN.finditer(body):
        prompt, answer = m.group(1).strip(), m.group(2).strip()
        turns.append((prompt, answer))
    if not turns:
        raise UserError(f"{where}: text has no '[INST] ... [/INST]' pair: {_snippet(text)} (for raw documents "
                        "set data.format: raw, or format: raw on the source)")
    for prompt, answer in turns:
        if not prompt:
            raise UserError(f"{where}: empty question between [INST] and [/INST]: {_snippet(text)}")
        if not answer:
            raise UserError(f"{where}: no answer after [/INST]: {_snippet(text)}")
    return turns


def _string_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if value is None:  # absent from the record, or null (an Arrow table gives None for both)
        raise UserError(f"{where}: the '{key}' field is missing or null; every record needs a non-empty '{key}'")
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {type(value).__name__} {_snippet(value)}")
    if required and not value.strip():
        raise UserError(f"{where}: '{key}' is empty")
    return value.strip()


def parse_messages(messages, where: str) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    system = ""
    turns: list[Turn] = []
    pending: str | None = None
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise UserError(f"{where}: message {j} must be {{\"role\": ..., \"content\": \"...\"}}, got {_snippet(msg)}")
        role, content = msg.get("role"), msg["content"].strip()
        if role == "system" and j == 0:
            system = content
        elif role == "user" and pending is None:
            pending = content
        elif role == "assistant" and pending is not None:
            if not pending or not content:
                raise UserError(f"{where}: message {j} or the one before it has empty content")
            turns.append((pending, content))
            pending = None
        else:
            raise UserError(
                f"{where}: message {j} has role {role!r}; roles must be an optional system message, "
                "then user and assistant alternating"
            )
    if pending is not None:
        raise UserError(f"{where}: the last message is from the user; conversations must end with the assistant")
    if not turns:
        raise UserError(f"{where}: 'messages' has no user/assistant pair after the system message")
    return Conversation(turns, system)


def _turns(record: dict, form: str, where: str) -> list[Turn]:
    if form == "text":
        if "text" not in record:
            raise UserError(f"{where}: no 'text' key (keys: {sorted(record)})")
        return parse_text(record["text"], where)
    if form == "prompt_response":
        return [(_string_field(record, "prompt", where), _string_field(record, "response", where))]
    if form == "instruction":
        instruction = _string_field(record, "instruction", where)
        extra = _string_field(record, "input", where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        return [(prompt, _string_field(record, "output", where))]
    raise ValueError(f"unknown format {form!r}")


def to_turns(record: dict, form: str, where: str) -> Conversation:
    """One record as a Conversation; `system` from the record's system message or `system` column."""
    if form == "messages":
        return parse_messages(record.get("messages"), where)
    return Conversation(_turns(record, form, where), _string_field(record, "system", where, required=False))


def raw_text(record: dict, where: str) -> str:
    """A raw record's document, as it is (no whitespace stripped: it may be code); refused when
    missing, not a string, or blank."""
    value = record.get("text")
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}: the 'text' field is missing, null or empty; every raw record needs a "
                        "non-empty 'text' (remove the record or fill it in)")
    if not isinstance(value, str):
        raise UserError(f"{where}: 'text' must be a string, got {type(value).__name__} {_snippet(value)}")
    return value


def records_to_conversations(records: list[dict], form: str, source: str) -> list:
    """Each record as a Conversation, or, for `raw` records, as its document (a str)."""
    if not records:
        raise UserError(f"{source}: the dataset is empty (no records)")
    if form == "auto":
        form = detect_format(records[0], source)
    if form == "raw":
        return [raw_text(rec, f"{source} {record_label(i)}") for i, rec in enumerate(records)]
    return [to_turns(rec, form, f"{source} {record_label(i)}") for i, rec in enumerate(records)]


def record_label(index: int) -> str:
    """How errors name a record: its index in the source, counted from 0 (and said so, since file
    lines are counted from 1; in a JSON Lines file without blank lines record i is line i + 1)."""
    return f"record {index} (0-based)"
