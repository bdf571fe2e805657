"""The chat format an exported model is served in: the template the run trained with
(`data.template` in the run folder's config.yaml, resolved against the tokenizer as training
resolved it), as a Jinja template for the GGUF's `tokenizer.chat_template`, an Ollama template,
and the stop words.

- `mistral-v1`: `<s>[INST] q1 [/INST] a1</s>[INST] q2 [/INST]`: text spans around the answers; a
  system message opens the first question, followed by a blank line (data/templates.py).
- `mistral-v3`: `<s>[INST]q1[/INST]a1</s>[INST]q2[/INST]` with `[INST]`/`[/INST]` control tokens,
  answers without trailing spaces; a system message opens the last question.
- `mistral-v7`: v3's turns with the system message as its own `[SYSTEM_PROMPT]...[/SYSTEM_PROMPT]`
  right after BOS (no blank line, no place in a question).
- `mistral-tekken`: the instruct version its tekken.json declares, v3 or v7, as above: the control
  tokens and text are the same, only the vocabulary differs.
- `tokenizer`: the checkpoint's own Jinja template, as it is. The Modelfile then carries no
  TEMPLATE: Ollama reads the GGUF's template (and maps the templates it knows, ChatML among them).

The Jinja forms render, once tokenized with special tokens parsed, the ids the training encoder
gives (`ChatTemplate.generation_ids`); tests/tools/test_export_formats.py checks it in llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass

from mistral_qlora.data.templates import JinjaTemplate, MistralV1Template, MistralV3Template, resolve_template

_SYSTEM_SPLIT = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
)

JINJA_V1 = (
    "{{ bos_token }}" + _SYSTEM_SPLIT
    + "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

JINJA_V3 = (
    "{{ bos_token }}" + _SYSTEM_SPLIT
    + "{% set ns = namespace(last=-1) %}"
    "{% for message in turns %}{% if message['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}"
    "{% endfor %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}"
    "{{ '[INST]' + (system if loop.index0 == ns.last else '') + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'].rstrip(' ') + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

JINJA_V7 = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '[SYSTEM_PROMPT]' + messages[0]['content'] + '[/SYSTEM_PROMPT]' }}{% set turns = messages[1:] %}"
    "{% else %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '[INST]' + message['content'] + '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'].rstrip(' ') + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)

# The same three in Ollama's Go template language (Ollama adds the BOS itself, from the GGUF).
OLLAMA_V1 = """{{- $system := "" }}
{{- range .Messages }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}[INST] {{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }} [/INST]
{{- else if eq .Role "assistant" }} {{ .Content }}</s>
{{- end }}
{{- end }}"""

OLLAMA_V3 = """{{- $system := "" }}{{- $last := 0 }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $last = $i }}{{ end }}{{ end }}
{{- range $i, $m := .Messages }}
{{- if eq $m.Role "system" }}{{ $system = $m.Content }}
{{- else if eq $m.Role "user" }}[INST]{{ if and $system (eq $i $last) }}{{ $system }}

{{ end }}{{ $m.Content }}[/INST]
{{- else if eq $m.Role "assistant" }}{{ $m.Content }}</s>
{{- end }}
{{- end }}"""

OLLAMA_V7 = """{{- range .Messages }}
{{- if eq .Role "system" }}[SYSTEM_PROMPT]{{ .Content }}[/SYSTEM_PROMPT]
{{- else if eq .Role "user" }}[INST]{{ .Content }}[/INST]
{{- else if eq .Role "assistant" }}{{ .Content }}</s>
{{- end }}
{{- end }}"""


@dataclass(frozen=True)
class ChatFormat:
    name: str  # the resolved data.template
    jinja: str  # tokenizer.chat_template
    ollama: str | None  # the Modelfile's TEMPLATE; None: Ollama reads the GGUF's
    stops: tuple[str, ...]  # the Modelfile's stop words


def chat_format(template_name: str, tokenizer) -> ChatFormat:
    """The format of `data.template=template_name` for this tokenizer, as training resolved it."""
    template = resolve_template(template_name, tokenizer)
    if isinstance(template, MistralV1Template):
        return ChatFormat(template.name, JINJA_V1, OLLAMA_V1, (tokenizer.eos_token, "[INST]"))
    if isinstance(template, MistralV3Template):  # v3, v7 and Tekken (of either version)
        jinja, ollama = (JINJA_V7, OLLAMA_V7) if template._v7 else (JINJA_V3, OLLAMA_V3)
        return ChatFormat(template.name, jinja, ollama, (tokenizer.eos_token, "[INST]"))
    assert isinstance(template, JinjaTemplate)
    stops = tuple(dict.fromkeys(tokenizer.convert_ids_to_tokens(template.stop_token_ids())))
    return ChatFormat(template.name, template.source, None, stops)


def modelfile_text(gguf_name: str, fmt: ChatFormat, adapter_gguf: str | None = None) -> str:
    """An Ollama Modelfile for `gguf_name` (with the LoRA `adapter_gguf` over it, when given)."""
    lines = ["# Ollama: ollama create NAME -f THIS_FILE, then ollama run NAME", f"FROM ./{gguf_name}"]
    if adapter_gguf:
        lines.append(f"ADAPTER ./{adapter_gguf}")
    if fmt.ollama is not None:
        lines.append(f'TEMPLATE """{fmt.ollama}"""')
    else:
        lines.append(f"# the chat template is the GGUF's own ({fmt.name}): Ollama reads it from the file")
    lines += [f'PARAMETER stop "{s}"' for s in fmt.stops]
    return "\n".join(lines) + "\n"
