"""mistral-common's own encoders, the reference the Mistral templates are checked against token for
token: the tokenizer from the same SentencePiece file, and a conversation as its request."""

from __future__ import annotations

import json

from mistral_qlora.data.formats import Conversation


def mistral_common_tokenizer(version: str, finetuning: bool, path=None):
    """mistral-common's tokenizer of a version's file ("tekken": Mistral-Nemo's), or of `path`."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_qlora.model.tokenizer import mistral_tokenizer_file

    mode = ValidationMode.finetuning if finetuning else ValidationMode.test
    return MistralTokenizer.from_file(str(path or mistral_tokenizer_file(version)), mode=mode)


def tekken_v7_file(folder):
    """Mistral-Nemo's tekken.json declaring instruct version v7 (Mistral-Small-2501's format on the
    same vocabulary), for the v7 Tekken encoding."""
    import json

    from mistral_qlora.model.tokenizer import mistral_tokenizer_file

    data = json.loads(mistral_tokenizer_file("tekken").read_text())
    data["config"]["version"] = "v7"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tekken.json").write_text(json.dumps(data))
    return folder / "tekken.json"


def chat_request(conv: Conversation, with_last_answer: bool = True):
    """The conversation as mistral-common's request: its messages (tool calls and results
    included) and its tools, the last assistant message left out where with_last_answer is false."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import FunctionCall, Tool, ToolCall

    messages = [SystemMessage(content=conv.system)] if conv.system else []
    chat = conv.chat_messages()
    if not with_last_answer and chat[-1]["role"] == "assistant":
        chat = chat[:-1]
    for m in chat:
        if m["role"] == "user":
            messages.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            messages.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=json.dumps(c["arguments"])))
                     for c in m.get("tool_calls") or ()]
            messages.append(AssistantMessage(content=m["content"] or None, tool_calls=calls or None))
    tools = [Tool.from_openai(t) for t in conv.tools] if conv.tools else None
    return ChatCompletionRequest(messages=messages, tools=tools)


def assistant_message(text):
    from mistral_common.protocol.instruct.messages import AssistantMessage

    return AssistantMessage(content=text)
