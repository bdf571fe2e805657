"""mistral-common's own encoders, the reference the Mistral templates are checked against token for
token: the tokenizer from the same SentencePiece file, and a conversation as its request."""

from __future__ import annotations

from mistral_qlora.data.formats import Conversation


def mistral_common_tokenizer(version: str, finetuning: bool):
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mistral_qlora.model.tokenizer import mistral_tokenizer_file

    mode = ValidationMode.finetuning if finetuning else ValidationMode.test
    return MistralTokenizer.from_file(str(mistral_tokenizer_file(version)), mode=mode)


def chat_request(conv: Conversation, with_last_answer: bool = True):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    messages = [SystemMessage(content=conv.system)] if conv.system else []
    for i, (prompt, answer) in enumerate(conv):
        messages.append(UserMessage(content=prompt))
        if with_last_answer or i < len(conv) - 1:
            messages.append(AssistantMessage(content=answer))
    return ChatCompletionRequest(messages=messages)


def assistant_message(text):
    from mistral_common.protocol.instruct.messages import AssistantMessage

    return AssistantMessage(content=text)
