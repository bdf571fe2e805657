"""Turn records of any accepted form into conversations: (prompt, answer) turns and a system prompt.

Forms (`data.format`, detected from the first record's keys when `auto`):
- `text`: the sample's (dataset/story.json) `<s>[INST] question [/INST] answer </s>` (turns may be chained);
- `prompt_response`: `prompt` + `response` columns;
- `instruction`: `instruction` (+ optional `input`) + `output` columns;
- `messages`: a list of `{"role", "content"}` (an optional system message, then alternating
  user/assistant, ending with the assistant); with tool calls (OpenAI's form) an assistant message
  may carry `tool_calls` and be followed by `tool` messages, one per call, and the record may have
  a `tools` list (`parse_tool_messages`).
The first three take an optional `system` column; `messages` takes its system message. The chat
template (`templates.py`) decides where the system prompt goes; this module only extracts text.
- `preference`: `chosen` + `rejected` (with a `prompt` or `messages` context, or as two full
  conversations): pairs, read by preference.py, not conversations; detected before the others.
- `raw`: a document in a `text` column (or a `.txt` file), no conversation: `raw_text` checks it and
  raw.py tokenizes it. Only chosen (data.format or a source's format), never detected: a `text`
  column holds the sample's `[INST]` form under `auto`.
"""

from __future__ import annotations

import json
import re

from mistral_qlora.errors import UserError

Turn = tuple[str, str]  # (user prompt, assistant answer)


class Conversation(list):
    """A list of (user prompt, assistant answer) turns, with the conversation's system prompt as
    `system` ("" when it has none). A plain list of turns works wherever a Conversation does."""

    def __init__(self, turns=(), system: str = "", messages: list[dict] | None = None,
                 tools: list[dict] | None = None):
        super().__init__(turns)
        self.system = system
        # A record with tool calls or results: its messages after the system one (user, assistant
        # with `content` and `tool_calls`, tool with `tool_call_id`), checked by parse_tool_messages;
        # the turns are then each user message with the assistant's last text before the next one.
        self.messages = messages
        self.tools = tools  # the record's `tools` (OpenAI's JSON schema form), or None

    def chat_messages(self) -> list[dict]:
        """The messages after the system prompt: the record's own where it has tool calls, else
        the turns as user/assistant pairs."""
        if self.messages is not None:
            return self.messages
        out = []
        for prompt, answer in self:
            out += [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        return out

    def __eq__(self, other):
        return (list.__eq__(self, other) and self.system == getattr(other, "system", "")
                and self.messages == getattr(other, "messages", None) and self.tools == getattr(other, "tools", None))

    def __ne__(self, other):
        return not self == other

    __hash__ = None

    def __repr__(self) -> str:
        extra = f", messages={self.messages!r}, tools={self.tools!r}" if self.messages is not None else ""
        return f"Conversation({list.__repr__(self)}, system={self.system!r}{extra})"

_TURN = re.compile(r"\[INST\](.*?)\[/INST\](.*?)(?:</s>|(?=\[INST\])|\Z)", re.DOTALL)

FORM_KEYS = {
    "text": ("text",),
    "messages": ("messages",),
    "prompt_response": ("prompt", "response"),
    "instruction": ("instruction", "output"),
    "raw": ("text",),
    "preference": ("chosen", "rejected"),  # data/preference.py reads these records, not this module
}
# Columns a form reads when present.
OPTIONAL_KEYS = {
    "text": ("system",),
    "messages": ("tools",),
    "prompt_response": ("system",),
    "instruction": ("input", "system"),
    "raw": (),
    "preference": ("prompt", "messages", "system"),
}


def _snippet(value, width: int = 60) -> str:
    s = " ".join((value if isinstance(value, str) else repr(value)).split())
    s = s if len(s) <= width else s[: width - 3] + "..."
    return repr(s) if isinstance(value, str) else s


def detect_format(record: dict, source: str) -> str:
    """The form of a record from its keys; `chosen` and `rejected` make a preference pair, whatever
    else the record has (its prompt or messages context)."""
    pair = [k for k in FORM_KEYS["preference"] if k in record]
    if len(pair) == 2:
        return "preference"
    if pair:
        missing = "rejected" if pair == ["chosen"] else "chosen"
        raise UserError(f"{source}: {record_label(0)} has '{pair[0]}' but no '{missing}'; a preference record "
                        f"needs both (map other column names with the source's columns: {{{missing}: ...}})")
    for form, keys in (("messages", FORM_KEYS["messages"]), ("text", FORM_KEYS["text"]),
                       ("prompt_response", FORM_KEYS["prompt_response"]), ("instruction", FORM_KEYS["instruction"])):
        if all(k in record for k in keys):
            return form
    raise UserError(
        f"{source}: {record_label(0)} has keys {sorted(record)}; expected 'text', 'messages', "
        "'prompt'+'response', 'instruction'+'output' or 'chosen'+'rejected' (see dataset/README.md)"
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


def parse_messages(messages, where: str, tools=None) -> Conversation:
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    if tools is not None or any(isinstance(m, dict) and (m.get("tool_calls") or m.get("role") == "tool")
                                for m in messages):
        return parse_tool_messages(messages, where, tools)
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
        return parse_messages(record.get("messages"), where, record.get("tools"))
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
    if form == "preference":
        raise UserError(f"{source}: preference pairs (chosen/rejected) are not conversations; they are read by "
                        "data/preference.py")
    if form == "raw":
        return [raw_text(rec, f"{source} {record_label(i)}") for i, rec in enumerate(records)]
    return [to_turns(rec, form, f"{source} {record_label(i)}") for i, rec in enumerate(records)]


def record_label(index: int) -> str:
    """How errors name a record: its index in the source, counted from 0 (and said so, since file
    lines are counted from 1; in a JSON Lines file without blank lines record i is line i + 1)."""
    return f"record {index} (0-based)"


def _drop_nulls(value):
    """A JSON value less its null object members: an Arrow table gives a record every key any
    record of its column has, as null where it has none (a JSON schema has no null members)."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _json_value(value, what: str, where: str):
    """A JSON value given as itself or as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: {what} is not JSON ({exc.msg} at character {exc.pos}): {_snippet(value)}") from None
    return _drop_nulls(value)


def parse_tools(tools, where: str) -> list[dict]:
    """The record's `tools`: OpenAI's form, a list of {"type": "function", "function": {"name",
    "description", "parameters"}} (a JSON string of it too)."""
    tools = _json_value(tools, "'tools'", where)
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            and t.get("type", "function") == "function" for t in tools):
        raise UserError(f"{where}: 'tools' must be a list of {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                        f"\"description\": ..., \"parameters\": {{...}}}}}}, got {_snippet(tools)}")
    return [{"type": "function", "function": t["function"]} for t in tools]


def _tool_call(call, j: int, where: str, names: set[str]) -> dict:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(call.get("id"), str):
        raise UserError(f"{where}: message {j} has a tool call that is not {{\"id\": ..., \"type\": \"function\", "
                        f"\"function\": {{\"name\": ..., \"arguments\": ...}}}}: {_snippet(call)}")
    name = fn["name"]
    if name not in names:
        raise UserError(f"{where}: message {j} calls the tool {name!r}, which is not in the record's 'tools' "
                        f"({', '.join(sorted(names)) or 'none given'}); add its schema to 'tools'")
    arguments = fn.get("arguments")
    arguments = {} if arguments is None else _json_value(arguments, f"the arguments of message {j}'s call {call['id']!r}",
                                                         where)
    return {"id": call["id"], "name": name, "arguments": arguments}


def parse_tool_messages(messages: list, where: str, tools=None) -> Conversation:
    """A `messages` record with tool calls or results (OpenAI's form): an optional system message,
    then user -> assistant, where an assistant message with `tool_calls` is followed by one `tool`
    message per call (`tool_call_id` naming it, in any order), then the assistant again; a user
    message may follow an assistant answer or the tool results. Every call names a tool of the
    record's `tools` and has JSON arguments; every call has its result, except in the record's
    last message (a call the record teaches, as mistral-common's fine-tuning mode allows)."""
    tool_list = parse_tools(tools, where) if tools is not None else None
    names = {t["function"]["name"] for t in tool_list or ()}
    system, out, turns = "", [], []
    pending: dict[str, int] = {}  # call id -> the message that made it, until its result
    previous = None
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant", "tool"):
            raise UserError(f"{where}: message {j} must be {{\"role\": system|user|assistant|tool, ...}}, "
                            f"got {_snippet(msg)}")
        role, content = msg["role"], msg.get("content")
        if content is not None and not isinstance(content, str):
            raise UserError(f"{where}: message {j}'s content must be a string, got {_snippet(content)}")
        content = content or ""
        if role != "tool" and pending:
            call = next(iter(pending))
            raise UserError(f"{where}: the tool call {call!r} of message {pending[call]} has no result "
                            f"(a 'tool' message with tool_call_id {call!r} before message {j})")
        if role == "system":
            if j != 0:
                raise UserError(f"{where}: message {j} is a system message; only the first message may be one")
            system = content.strip()
        elif role == "user":
            if previous not in (None, "system", "assistant", "tool") or not content.strip():
                raise UserError(f"{where}: message {j} (user) must be non-empty and follow the system message, "
                                "an assistant answer or tool results")
            out.append({"role": "user", "content": content.strip()})
            turns.append([content.strip(), ""])
        elif role == "assistant":
            if previous not in ("user", "tool"):
                raise UserError(f"{where}: message {j} (assistant) must follow a user message or tool results")
            calls = msg.get("tool_calls") or []
            if not isinstance(calls, list):
                raise UserError(f"{where}: message {j}'s 'tool_calls' must be a list, got {_snippet(calls)}")
            calls = [_tool_call(c, j, where, names) for c in calls]
            if not calls and not content.strip():
                raise UserError(f"{where}: message {j} (assistant) has neither content nor tool_calls")
            ids = [c["id"] for c in calls]
            if len(set(ids)) != len(ids):
                raise UserError(f"{where}: message {j} has two tool calls with the same id; give each its own")
            pending = dict.fromkeys(ids, j)
            message = {"role": "assistant", "content": content.strip()}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
            if content.strip():
                turns[-1][1] = content.strip()
        else:
            call_id = msg.get("tool_call_id")
            if call_id not in pending:
                raise UserError(f"{where}: message {j} is a tool result for the call {call_id!r}, which no "
                                "assistant message before it made and awaits; set its 'tool_call_id' to a call's id")
            del pending[call_id]
            out.append({"role": "tool", "content": content, "tool_call_id": call_id})
        previous = role
    if previous in ("system", "user", "tool", None):
        raise UserError(f"{where}: the last message is {'from the ' + previous if previous else 'missing'}; "
                        "conversations must end with the assistant")
    return Conversation([tuple(t) for t in turns], system, messages=out, tools=tool_list)
