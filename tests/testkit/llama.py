"""A tiny random Llama-architecture checkpoint (no sliding window, no attention bias, tied
embeddings, as SmolLM2) with a small byte-level BPE tokenizer and its own ChatML template, built
into a folder from fixed seeds: for runs on a checkpoint that is not Mistral's architecture."""

from __future__ import annotations

from pathlib import Path

from testkit import QA

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def chatml_bpe_tokenizer(texts: list[str], vocab_size: int = 512, chat_template: str | None = CHATML,
                         bos_token: str = "<|im_start|>", additional: tuple[str, ...] = tuple(SPECIALS)):
    """A byte-level BPE tokenizer trained on `texts`: <|im_start|>/<|im_end|> special, <|im_end|> as
    EOS (the end of an assistant turn), <|endoftext|> as padding, `chat_template` (ChatML's by default)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos_token, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", additional_special_tokens=list(additional))
    tok.chat_template = chat_template
    return tok


def build_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """`folder` holding a LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 KV heads) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = chatml_bpe_tokenizer([t for pair in QA for t in pair] + ["system", "user", "assistant"])
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         attention_bias=False, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
