"""Chat templates: conversations -> token ids and labels, and the prompt a model answers.

`data.template`:
- `mistral-v1`: `<s>[INST] q1 [/INST] a1</s>[INST] q2 [/INST] a2</s>` as text, each span tokenized
  on its own (SentencePiece's leading space on each), exactly as mistral-common's v1 encoder; a
  system prompt opens the FIRST user message, followed by a blank line.
- `mistral-v3`: `<s>[INST]q1[/INST]a1</s>[INST]q2[/INST]a2</s>` with `[INST]`/`[/INST]` as the
  control tokens 3 and 4, exactly as mistral-common's v3 encoder; a system prompt opens the LAST
  user message, followed by a blank line (mistral-common's convention for v2/v3).
- `mistral-v7`: v3's format with the system prompt as its own `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`
  after BOS and tool results as `[TOOL_RESULTS]id[TOOL_CONTENT]content[/TOOL_RESULTS]`, on the v7
  SentencePiece vocabulary (control tokens 16-18), as mistral-common's v7 encoder.
- `mistral-tekken`: a Tekken vocabulary (`tekken.json`, data/tekken.py) with the instruct version
  that file declares: v3 (Mistral-Nemo) or v7, encoded as mistral-common encodes them.
- `tokenizer`: the checkpoint's own Jinja chat template, through `apply_chat_template`.
- `auto`: `mistral-tekken` for a Tekken checkpoint; `mistral-v7`, `mistral-v3` or `mistral-v1` when
  the tokenizer's vocabulary is Mistral's of that version (`mistral_version`); in both cases when
  its chat template, if it has one, is Mistral's `[INST]` one; otherwise the checkpoint's chat
  template; a tokenizer with neither gets `mistral-v1`.

Tool calls (records with `tools`, assistant `tool_calls` and `tool` messages; formats.py) in v3,
v7 and Tekken as mistral-common's fine-tuning mode: `[AVAILABLE_TOOLS]` + the tools' JSON +
`[/AVAILABLE_TOOLS]` before the LAST user message's `[INST]`; an assistant's calls as
`[TOOL_CALLS]` + the JSON list of {name, arguments, id} + EOS (v7: after its text, if any); each
result as `[TOOL_RESULTS]`...`[/TOOL_RESULTS]`. The learned tokens are every assistant message as
mistral-common encodes it (text, calls, EOS); tool results and tools are context. `mistral-v1`
has no tool tokens and refuses tool records; a Jinja template renders them through its own
`tools` support (per conversation) where it has one, else refuses them.

Labels are -100 everywhere except on the assistant turns (their content and the end of turn after
it), unless train_on_prompt; the first token (BOS) is never a target. Text spans of a whole batch
of conversations go through the tokenizer in one call, with special-token strings inside the text
read as text (as SentencePiece and mistral-common read them); the Mistral templates call
SentencePiece itself where it gives the tokenizer's ids exactly (data/spm.py).

How a Jinja template's assistant turns are found: a template with `{% generation %}` blocks marks
them itself (`apply_chat_template(return_assistant_tokens_mask=True)`). Without them a template
is *separable* when rendering the conversation up to each user turn with the generation prompt,
then up to the assistant's answer, then the whole, gives strings that each extend the previous one
and the answer's text is in what the answer added. A template that is neither is refused when the
template is resolved.

The end of a turn is learned with the answer: an answer's span runs from its content (or its
`{% generation %}` block) to the end of what the template emits for that assistant message, the
rendering of the conversation up to and including it (`<|im_end|>\n`, `</s>`, `<|eot_id|>`...),
as mistral-common's templates learn the EOS after each answer; without it a model never learns to
stop. Where that rendering is no prefix of the whole conversation, a marked template's block is
kept as it is. The special tokens in the learned end of the probe's answer are the template's stop
tokens; a template that puts none there gets a warning (`JinjaTemplate.warnings`), which `prepare`
and `train` print.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Sequence

import numpy as np

from mistral_qlora.data.formats import Conversation, Turn
from mistral_qlora.data.ragged import ID, Ragged, offsets_of, segments
from mistral_qlora.data.spm import spm_encoder, tokenizer_ids
from mistral_qlora.data.tekken import TekkenEncoder, tekken_file, tekken_version
from mistral_qlora.errors import UserError

IGNORE_INDEX = -100

TEMPLATES = ("auto", "mistral-v1", "mistral-v3", "mistral-v7", "mistral-tekken", "tokenizer")
# The instruct versions of a Tekken file the Tekken template encodes (later ones changed the tool format).
TEKKEN_VERSIONS = ("v3", "v7")

# "[INST]" in the Mistral v1 (Mistral-7B v0.1/v0.2, Mixtral-8x7B) 32000-token vocabulary: no
# control tokens, three text pieces. Llama-2 shares the size and BOS/EOS ids but not these pieces.
_V1_VOCAB_SIZE = 32000
_V1_INST = ([733, 16289, 28793], ["▁[", "INST", "]"])
# The v3 (Mistral-7B v0.3) vocabulary: 32768 pieces, [INST] and [/INST] control tokens 3 and 4.
_V3_VOCAB_SIZE = 32768
_V3_CONTROL = ([3, 4], ["[INST]", "[/INST]"])
# The v7 SentencePiece vocabulary: v3's size and control tokens, and [SYSTEM_PROMPT] and
# [/SYSTEM_PROMPT] as control tokens 16 and 17.
_V7_CONTROL = ([16, 17], ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"])

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
# A conversation rendered to find out whether (and how) a Jinja template marks assistant turns.
_PROBE = Conversation([("What is two plus two?", "Two plus two is four."), ("And times three?", "Twelve.")])


def mistral_version(tokenizer) -> str | None:
    """'v7', 'v3', 'v1' or None, from the vocabulary alone: v3 has 32768 pieces with [INST]/[/INST]
    as the special tokens 3/4, v7 also [SYSTEM_PROMPT]/[/SYSTEM_PROMPT] as 16/17; v1 has 32000
    pieces with "[INST]" as the text pieces 733 16289 28793."""
    size = getattr(tokenizer, "vocab_size", None)
    if size == _V3_VOCAB_SIZE and tekken_file(tokenizer) is None:
        special = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                       if t.special}
        found = [tokenizer.convert_tokens_to_ids(names) == ids and set(names) <= special
                 for ids, names in (_V3_CONTROL, _V7_CONTROL)]
        if all(found):
            return "v7"
        if found[0]:
            return "v3"
    if size == _V1_VOCAB_SIZE:
        ids, pieces = _V1_INST
        if tokenizer.convert_ids_to_tokens(ids) == pieces:
            return "v1"
    return None


def chat_template_source(tokenizer) -> str | None:
    """The tokenizer's own (default) Jinja chat template, or None."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        return tokenizer.get_chat_template()
    except ValueError:  # several named templates and no "default" among them
        return None


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or "the tokenizer"


def resolve_template(name: str, tokenizer) -> "ChatTemplate":
    """The template `data.template=name` means for this tokenizer (see the module docstring)."""
    if name not in TEMPLATES:
        raise UserError(f"data.template: unknown template {name!r}; choose one of {', '.join(TEMPLATES)}")
    tekken = tekken_file(tokenizer)
    tekken_v = tekken_version(tekken) if tekken is not None else None
    version = "tekken" if tekken_v in TEKKEN_VERSIONS else (None if tekken else mistral_version(tokenizer))
    own = chat_template_source(tokenizer)
    if name == "auto":
        if version is not None and (own is None or "[INST]" in own):
            why = "its own chat template is Mistral's [INST] one" if own else "it has no chat template"
            what = f"a Tekken vocabulary ({tekken_v})" if version == "tekken" else f"a Mistral {version} vocabulary"
            name, reason = f"mistral-{version}", f"auto: {what} and {why}"
        elif own is not None:
            name, reason = "tokenizer", "auto: the checkpoint's own chat template"
        elif tekken is not None:
            raise UserError(f"data.template=auto: {_name(tokenizer)} has a Tekken vocabulary of instruct version "
                            f"{tekken_v!r}, which is not encoded here ({', '.join(TEKKEN_VERSIONS)} are), and no chat "
                            "template; give the checkpoint a chat template and set data.template=tokenizer")
        else:
            name, reason = "mistral-v1", "auto: not a Mistral vocabulary and no chat template; the v1 text template"
    else:
        reason = f"data.template={name}"
    if name == "mistral-v1":
        return MistralV1Template(tokenizer, reason)
    if name in ("mistral-v3", "mistral-v7"):
        needs = name.removeprefix("mistral-")
        if version != needs and not (needs == "v3" and version == "v7"):
            what = {"v3": "[INST] and [/INST] as control tokens 3 and 4",
                    "v7": "[SYSTEM_PROMPT] and [/SYSTEM_PROMPT] as control tokens 16 and 17"}[needs]
            raise UserError(f"data.template={name} needs Mistral's {needs} vocabulary ({what}); "
                            f"{_name(tokenizer)} does not have it: set data.template to auto or mistral-v1")
        return (MistralV3Template if needs == "v3" else MistralV7Template)(tokenizer, reason)
    if name == "mistral-tekken":
        if tekken is None or tekken_v not in TEKKEN_VERSIONS:
            detail = (f"its {tekken.name} declares instruct version {tekken_v!r} ({', '.join(TEKKEN_VERSIONS)} are "
                      "encoded here)" if tekken else "it has no tekken.json")
            raise UserError(f"data.template=mistral-tekken needs a Tekken vocabulary; {_name(tokenizer)}: {detail}; "
                            "set data.template to auto or tokenizer")
        return TekkenTemplate(tokenizer, tekken, tekken_v, reason)
    if own is None:
        raise UserError(f"data.template=tokenizer: {_name(tokenizer)} has no chat template; set data.template to "
                        "auto, mistral-v1, mistral-v3, mistral-v7 or mistral-tekken")
    return JinjaTemplate(tokenizer, own, reason)


def _as_conversation(conversation) -> Conversation:
    if isinstance(conversation, str):
        return Conversation([(conversation, "")])
    return conversation if isinstance(conversation, Conversation) else Conversation(conversation)


class ChatTemplate:
    """What every template offers the data pipeline and generation. A template implements
    `encode` (lists) or `encode_ragged` (one ragged batch each of ids and labels, same offsets);
    each is derived from the other."""

    name: str

    def __init__(self, tokenizer, reason: str = ""):
        self.tokenizer = tokenizer
        self.reason = reason
        self.warnings: list[str] = []  # what a user should know about the template (printed by prepare, train)

    def fingerprint(self) -> str:
        """What identifies the rendering (for caches of tokenized data, with the tokenizer's own)."""
        return self.name

    def describe(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason else self.name

    def encode(self, conversations: Sequence[Sequence[Turn]], train_on_prompt: bool = False
               ) -> list[tuple[list[int], list[int]]]:
        """(input_ids, labels) for each conversation, in order."""
        ids, labels = self.encode_ragged(conversations, train_on_prompt)
        return list(zip(ids.lists(), labels.lists()))

    def encode_ragged(self, conversations: Sequence[Sequence[Turn]], train_on_prompt: bool = False
                      ) -> tuple[Ragged, Ragged]:
        """`encode` as ragged batches: the ids, and the labels (the same offsets)."""
        pairs = self.encode(conversations, train_on_prompt)
        return Ragged.from_lists([i for i, _ in pairs]), Ragged.from_lists([lab for _, lab in pairs])

    def generation_ids(self, conversation: str | Sequence[Turn]) -> list[int]:
        """The ids a model continues to answer the last turn's prompt (the last answer is ignored):
        the system prompt, the earlier turns, the last prompt and the generation prompt."""
        raise NotImplementedError

    def stop_token_ids(self) -> list[int]:
        """The tokens that end an assistant turn."""
        return [self.tokenizer.eos_token_id]


def _labels(ids: list[int], learned: list[bool], train_on_prompt: bool) -> list[int]:
    labels = [t if (keep or train_on_prompt) else IGNORE_INDEX for t, keep in zip(ids, learned)]
    if labels:
        labels[0] = IGNORE_INDEX  # the first token (BOS) is never predicted from anything
    return labels


class _MistralTemplate(ChatTemplate):
    """A conversation as pieces: token ids placed as they are, or text tokenized on its own."""

    def _pieces(self, conv: Conversation, answer_last: bool) -> list[tuple[list[int] | str, bool]]:
        raise NotImplementedError

    def __init__(self, tokenizer, reason: str = ""):
        super().__init__(tokenizer, reason)
        # SentencePiece itself where it gives the tokenizer's ids exactly (data/spm.py), else the tokenizer
        self.encoder = spm_encoder(tokenizer)
        # read once: the tokenizer's attribute lookups cost more than a record's pieces
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def _tokenize(self, texts: list[str]) -> Ragged:
        if self.encoder is not None:
            return self.encoder.encode_ragged(texts)
        return Ragged.from_lists(tokenizer_ids(self.tokenizer, texts))

    def _assemble(self, pieces_per_conv: list[list[tuple[list[int] | str, bool]]], train_on_prompt: bool
                  ) -> tuple[Ragged, Ragged]:
        """(ids, labels) of the conversations: a piece's labels are its ids where it is learned
        (or train_on_prompt), else IGNORE_INDEX; the first token is never a target.

        The texts of the whole batch are tokenized at once; then every piece is a range of one
        pool (the texts' ids followed by the token-id pieces), and the conversations are one
        gather of those ranges (ragged.py)."""
        texts = [p for pieces in pieces_per_conv for p, _ in pieces if isinstance(p, str)]
        encoded = self._tokenize(texts)
        text_bounds = encoded.offsets.tolist()
        fixed: list[int] = []  # the token-id pieces, after the texts' ids in the pool
        base = len(encoded.values)
        starts, lengths, learned, per_conv = [], [], [], []
        t = 0
        for pieces in pieces_per_conv:
            per_conv.append(len(pieces))
            for piece, keep in pieces:
                if isinstance(piece, str):
                    starts.append(text_bounds[t])
                    lengths.append(text_bounds[t + 1] - text_bounds[t])
                    t += 1
                else:
                    starts.append(base + len(fixed))
                    lengths.append(len(piece))
                    fixed += piece
                learned.append(keep or train_on_prompt)
        pool = np.concatenate([encoded.values, np.asarray(fixed, dtype=ID)])
        lengths_np = np.asarray(lengths, dtype=np.int64)
        ids = pool[segments(np.asarray(starts, dtype=np.int64), lengths_np)]
        labels = np.where(np.repeat(np.asarray(learned, dtype=bool), lengths_np), ids, ID(IGNORE_INDEX))
        offsets = offsets_of(lengths_np)[offsets_of(np.asarray(per_conv, dtype=np.int64))]
        firsts = offsets[:-1][np.diff(offsets) > 0]
        labels[firsts] = IGNORE_INDEX
        return Ragged(ids, offsets), Ragged(labels, offsets)

    def encode_ragged(self, conversations, train_on_prompt=False):
        pieces = [self._pieces(_as_conversation(c), answer_last=True) for c in conversations]
        return self._assemble(pieces, train_on_prompt)

    def generation_ids(self, conversation):
        ids, _ = self._assemble([self._pieces(_as_conversation(conversation), answer_last=False)], False)
        return ids.values.tolist()


class MistralV1Template(_MistralTemplate):
    name = "mistral-v1"

    def _pieces(self, conv, answer_last):
        if conv.messages is not None or conv.tools:
            raise UserError("data.template=mistral-v1 has no tool tokens and cannot encode records with tools, "
                            "tool_calls or tool messages; use a checkpoint with Mistral's v3, v7 or Tekken vocabulary "
                            "(data.template auto) or one whose chat template supports tools")
        bos, eos = self.bos, self.eos
        pieces: list[tuple[list[int] | str, bool]] = [([bos], False)]
        for i, (prompt, answer) in enumerate(conv):
            if i == 0 and conv.system:
                prompt = f"{conv.system}\n\n{prompt}"
            pieces.append((f"[INST] {prompt} [/INST]", False))
            if answer_last or i < len(conv) - 1:
                pieces += [(answer, True), ([eos], True)]
        return pieces


class MistralV3Template(_MistralTemplate):
    """mistral-common's v3 instruct format, message by message (tool calls included); v7 and
    Tekken are this with their differences (`_v7`, the encoder)."""

    name = "mistral-v3"
    _v7 = False  # the system prompt as its own message, tool results as id + [TOOL_CONTENT] + text

    def __init__(self, tokenizer, reason: str = ""):
        super().__init__(tokenizer, reason)
        self._control(lambda names: tokenizer.convert_tokens_to_ids(names))

    def _control(self, ids) -> None:
        names = ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                 "[/TOOL_RESULTS]"]
        if self._v7:
            names += ["[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]"]
        self.control = dict(zip(names, ids(names)))
        self.begin_inst, self.end_inst = self.control["[INST]"], self.control["[/INST]"]

    def _pieces(self, conv, answer_last):
        c = self.control
        messages = conv.chat_messages()
        if not answer_last and messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        last_user = max((k for k, m in enumerate(messages) if m["role"] == "user"), default=-1)
        pieces: list[tuple[list[int] | str, bool]] = [([self.bos], False)]
        if self._v7 and conv.system:
            pieces += [([c["[SYSTEM_PROMPT]"]], False), (conv.system, False), ([c["[/SYSTEM_PROMPT]"]], False)]
        for k, m in enumerate(messages):
            role = m["role"]
            if role == "user":
                if k == last_user and conv.tools:
                    pieces += [([c["[AVAILABLE_TOOLS]"]], False), (_tools_json(conv.tools), False),
                               ([c["[/AVAILABLE_TOOLS]"]], False)]
                text = m["content"]
                if k == last_user and conv.system and not self._v7:
                    text = f"{conv.system}\n\n{text}"
                pieces += [([self.begin_inst], False), (text, False), ([self.end_inst], False)]
            elif role == "assistant":
                calls = m.get("tool_calls")
                if m["content"] and calls and not self._v7:
                    raise UserError(f"data.template={self.name}: an assistant message has both content and "
                                    "tool_calls, which this format cannot encode (mistral-common refuses it); put the "
                                    "text in a message of its own")
                if m["content"]:
                    pieces.append((m["content"].rstrip(" "), True))
                if calls:
                    pieces += [([c["[TOOL_CALLS]"]], True), (_calls_json(calls), True)]
                pieces.append(([self.eos], True))
            elif self._v7:
                pieces += [([c["[TOOL_RESULTS]"]], False), (m["tool_call_id"], False), ([c["[TOOL_CONTENT]"]], False),
                           (m["content"], False), ([c["[/TOOL_RESULTS]"]], False)]
            else:
                result = {"content": _json_or_text(m["content"]), "call_id": m["tool_call_id"]}
                pieces += [([c["[TOOL_RESULTS]"]], False), (json.dumps(result, ensure_ascii=False), False),
                           ([c["[/TOOL_RESULTS]"]], False)]
        return pieces


class MistralV7Template(MistralV3Template):
    name = "mistral-v7"
    _v7 = True


class TekkenTemplate(MistralV3Template):
    """A Tekken vocabulary with the instruct version its tekken.json declares (v3 or v7), the text
    encoded by mistral-common's Tekkenizer (data/tekken.py)."""

    name = "mistral-tekken"

    def __init__(self, tokenizer, path, version: str, reason: str = ""):
        self.version = version
        self._v7 = version == "v7"
        ChatTemplate.__init__(self, tokenizer, reason)
        self.encoder = TekkenEncoder(path)
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self._control(lambda names: [self.encoder.special_id(n) for n in names])

    def fingerprint(self) -> str:
        return f"{self.name}:{self.version}"


def _tools_json(tools: list[dict]) -> str:
    """The tools as mistral-common writes them: each {"type", "function": {"name", "description",
    "parameters"}} (its Tool model's fields and defaults, `strict` left out)."""
    out = []
    for tool in tools:
        fn = tool["function"]
        out.append({"type": "function", "function": {"name": fn["name"], "description": fn.get("description") or "",
                                                     "parameters": fn.get("parameters", {})}})
    return json.dumps(out, ensure_ascii=False)


def _calls_json(calls: list[dict]) -> str:
    """An assistant's calls as mistral-common writes them: [{"name", "arguments", "id"}], the
    arguments as the JSON value they are."""
    return json.dumps([{"name": call["name"], "arguments": call["arguments"],
                        **({"id": call["id"]} if call["id"] and call["id"] != "null" else {})} for call in calls],
                      ensure_ascii=False)


def _json_or_text(content: str):
    """A v3 tool result's content as mistral-common reads it: the JSON value it holds (an empty
    result is {}), else the text."""
    if not content:
        return {}
    try:
        return json.loads(content)
    except json.JSONDecodeError:
        return content


class JinjaTemplate(ChatTemplate):
    """The checkpoint's chat template, through `apply_chat_template`."""

    name = "tokenizer"

    def __init__(self, tokenizer, source: str, reason: str = ""):
        super().__init__(tokenizer, reason)
        self.source = source
        self.marked = bool(_GENERATION_BLOCK.search(source))
        if not getattr(tokenizer, "is_fast", False):
            raise UserError(f"data.template=tokenizer needs a fast tokenizer (tokenizer.json) to map its chat "
                            f"template's text to tokens; {_name(tokenizer)} is not one")
        self._end_ids: list[int] = []
        self._check_marks()

    def fingerprint(self) -> str:
        return f"tokenizer:{hashlib.sha256(self.source.encode()).hexdigest()[:16]}"

    def _refuse(self, detail: str) -> UserError:
        return UserError(
            f"data.template=tokenizer: the chat template of {_name(self.tokenizer)} cannot mark the assistant "
            f"turns ({detail}); wrap each assistant message's content in {{% generation %}}...{{% endgeneration %}} "
            "or set data.template to mistral-v1 or mistral-v3")

    def _tool_messages(self, conv: Conversation, answer_last: bool) -> list[dict]:
        """A tool record in OpenAI's form for the template's own tools support (a template that
        names no `tools`, or cannot mark its assistant turns with {% generation %}, is refused)."""
        if "tools" not in self.source or not self.marked:
            why = "has no tools support" if "tools" not in self.source else "has no {% generation %} marks"
            raise UserError(f"data.template=tokenizer: the chat template of {_name(self.tokenizer)} {why}, so it "
                            "cannot encode records with tools or tool calls; use a Mistral template (mistral-v3, "
                            "mistral-v7, mistral-tekken) or a chat template with tools and {% generation %} marks")
        messages = [{"role": "system", "content": conv.system}] if conv.system else []
        chat = conv.chat_messages()
        if not answer_last and chat[-1]["role"] == "assistant":
            chat = chat[:-1]
        for m in chat:
            if m["role"] == "assistant" and m.get("tool_calls"):
                calls = [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                         for c in m["tool_calls"]]
                messages.append({"role": "assistant", "content": m["content"], "tool_calls": calls})
            else:
                messages.append(dict(m))
        return messages

    def _messages(self, conv: Conversation, answer_last: bool = True) -> list[dict]:
        if conv.messages is not None or conv.tools:
            return self._tool_messages(conv, answer_last)
        messages = [{"role": "system", "content": conv.system}] if conv.system else []
        for i, (prompt, answer) in enumerate(conv):
            messages.append({"role": "user", "content": prompt})
            if answer_last or i < len(conv) - 1:
                messages.append({"role": "assistant", "content": answer})
        return messages

    def _render(self, conversations: list[list[dict]], add_generation_prompt: bool, **kwargs):
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(conversations, add_generation_prompt=add_generation_prompt,
                                                      **kwargs)
        except TemplateError as exc:
            raise UserError(f"data.template=tokenizer: the chat template of {_name(self.tokenizer)} refused a "
                            f"conversation: {exc}") from None

    def _check_marks(self) -> None:
        """Refuse now, before any data, a template whose assistant turns cannot be told apart; find
        the special tokens that end an assistant turn, and warn where there are none."""
        ids, learned = self._encode_marked([_PROBE]) if self.marked else self._encode_separable([_PROBE])
        if not any(learned[0]):
            raise self._refuse("its {% generation %} blocks mark no token")
        first = learned[0].index(True)
        run = ids[0][first:first + (learned[0][first:] + [False]).index(False)]  # the first answer's learned run
        special = set(self.tokenizer.all_special_ids)
        eos = self.tokenizer.eos_token_id
        ends = [t for t in run if t in special]
        self._end_ids = list(dict.fromkeys(t for t in ends if t != eos))
        if not ends:
            answer = _PROBE[0][1]
            text = self.tokenizer.decode(run)
            after = text.split(answer, 1)[1] if answer in text else ""
            what = f"emits {after!r}, which holds no special token of the tokenizer" if after else "emits nothing"
            self.warnings.append(
                f"the chat template of {_name(self.tokenizer)} has no recognisable end of turn: after an assistant's "
                f"answer it {what}, so the model learns no token to stop at and generation runs to max_new_tokens; "
                "add the end-of-turn marker as a special token, end each assistant message with eos_token, or set "
                "data.template to mistral-v1 or mistral-v3")

    def stop_token_ids(self) -> list[int]:
        return [self.tokenizer.eos_token_id, *self._end_ids]

    def _turn_ends(self, convs: list[Conversation]) -> tuple[list[str], list[list[int]]]:
        """Each conversation's rendering, and where each of its assistant turns ends in it: the
        length of the rendering up to and including that assistant message, where that is a
        prefix of the whole (else the turn has no end here)."""
        upto, counts = [], []
        for conv in convs:
            messages = self._messages(conv)
            offset = 1 if conv.system else 0
            upto += [messages[:offset + 2 * i + 2] for i in range(len(conv))]
            counts.append(len(conv))
        texts = self._render(upto, False, tokenize=False)
        fulls, ends, k = [], [], 0
        for n in counts:
            full = texts[k + n - 1]
            fulls.append(full)
            ends.append([len(t) for t in texts[k:k + n] if full.startswith(t)])
            k += n
        return fulls, ends

    def _encode_marked(self, convs: list[Conversation]) -> tuple[list[list[int]], list[list[bool]]]:
        """The template's {% generation %} marks, each marked run extended to the end of its turn."""
        if any(c.tools for c in convs):  # tools differ from record to record: one rendering each
            pairs = [self._encode_marked_one(c) for c in convs]
            return [i for i, _ in pairs], [m for _, m in pairs]
        out = self._render([self._messages(c) for c in convs], False, tokenize=True, return_dict=True,
                           return_assistant_tokens_mask=True, tokenizer_kwargs={"return_offsets_mapping": True})
        _, turn_ends = self._turn_ends(convs)
        learned = []
        for offsets, mask, ends in zip(out["offset_mapping"], out["assistant_masks"], turn_ends):
            spans: list[tuple[int, int]] = []
            for (start, end), keep in zip(offsets, mask):
                if not keep:
                    continue
                if spans and start <= spans[-1][1]:
                    spans[-1] = (spans[-1][0], max(end, spans[-1][1]))
                else:
                    spans.append((start, end))
            spans = [(start, min((e for e in ends if e >= end), default=end)) for start, end in spans]
            learned.append(_overlap(offsets, spans))
        return list(out["input_ids"]), learned

    def _encode_marked_one(self, conv: Conversation) -> tuple[list[int], list[bool]]:
        out = self._render([self._messages(conv)], False, tokenize=True, return_dict=True,
                           return_assistant_tokens_mask=True, tools=conv.tools)
        return list(out["input_ids"][0]), [bool(m) for m in out["assistant_masks"][0]]

    def _separate(self, conv: Conversation, before: list[str], upto: list[str]) -> list[tuple[int, int]]:
        """Character spans of the learned text in the last of `upto` (the whole conversation): each
        answer from its content to the end of its turn."""
        full = upto[-1]
        spans = []
        for (_, answer), head, text in zip(conv, before, upto):
            if not text.startswith(head) or not full.startswith(text):
                raise self._refuse("rendering a conversation turn by turn does not extend the previous rendering, "
                                   "and there is no {% generation %} block")
            start = text.find(answer, len(head)) if answer else -1
            if start < 0:
                raise self._refuse("an answer's text is not where the next rendering adds it, and there is no "
                                   "{% generation %} block")
            spans.append((start, len(text)))  # the answer and what the template ends its turn with
        return spans

    def _encode_separable(self, convs: list[Conversation]) -> tuple[list[list[int]], list[list[bool]]]:
        heads, upto = [], []
        for conv in convs:
            messages = self._messages(conv)
            offset = 1 if conv.system else 0
            for i in range(len(conv)):
                heads.append(messages[:offset + 2 * i + 1])
                upto.append(messages[:offset + 2 * i + 2])
        heads_text = self._render(heads, True, tokenize=False)
        upto_text = self._render(upto, False, tokenize=False)
        texts, spans, k = [], [], 0
        for conv in convs:
            n = len(conv)
            spans.append(self._separate(conv, heads_text[k:k + n], upto_text[k:k + n]))
            texts.append(upto_text[k + n - 1])
            k += n
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        learned = [_overlap(offsets, s) for offsets, s in zip(enc["offset_mapping"], spans)]
        return list(enc["input_ids"]), learned

    def encode(self, conversations, train_on_prompt=False):
        convs = [_as_conversation(c) for c in conversations]
        if not convs:
            return []
        for conv in convs:
            if conv.messages is not None or conv.tools:
                self._messages(conv)  # refused here where the template cannot encode tools
        ids, learned = self._encode_marked(convs) if self.marked else self._encode_separable(convs)
        return [(i, _labels(i, keep, train_on_prompt)) for i, keep in zip(ids, learned)]

    def generation_ids(self, conversation):
        conv = _as_conversation(conversation)
        messages = self._messages(conv, answer_last=False)
        return list(self._render([messages], True, tokenize=True, return_dict=False, tools=conv.tools)[0])


def _overlap(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Tokens whose characters overlap a span (the rule of apply_chat_template's assistant mask)."""
    learned, k = [], 0
    for start, end in offsets:
        while k < len(spans) and start >= spans[k][1]:
            k += 1
        learned.append(k < len(spans) and end > spans[k][0])
    return learned
