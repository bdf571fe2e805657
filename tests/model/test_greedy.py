"""Greedy answers (model/greedy.py) keep what the model generated, whitespace included."""

import torch

from mistral_qlora.data.templates import resolve_template
from mistral_qlora.model.greedy import greedy_answers

from testkit import tiny_path


class _Newlines(torch.nn.Module):
    """A model whose generate() appends two newline tokens to the prompt."""

    def __init__(self, newline: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.newline = newline

    def generate(self, input_ids, **kwargs):
        return torch.cat([input_ids, torch.full((1, 2), self.newline)], dim=1)


def test_an_answer_of_newlines_comes_back_as_newlines():
    from mistral_qlora.model.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_path())
    newline = tok.convert_tokens_to_ids("<0x0A>")
    (answer,) = greedy_answers(_Newlines(newline), tok, ["Hi?"], 4, resolve_template("auto", tok))
    assert answer == "\n\n"
