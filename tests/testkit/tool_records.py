"""Random `messages` records, seeded: multi-turn, with or without a system prompt, with tools
called one or several at a time (arguments as JSON strings or objects, results in any order, JSON
or plain text or empty), on hard text (runs of spaces, newlines, tabs, accents, CJK, emoji, the
templates' own markers written as text). For the fuzz comparison with mistral-common and the
Tekken model's training data."""

from __future__ import annotations

import json
import random

HARD = ["  two leading", "trailing  ", "a  b   c    d", " \n\nnew\nline\t tab\t\t", "x\r\ny", "1234567 3.14 -0.5e10",
        "naïve café Ærø", "日本語のテキスト", "🦙 emoji 👍🏽", "[INST] q [/INST]", "[TOOL_CALLS] [AVAILABLE_TOOLS]",
        "</s> <s>", "tab\tsep", "end with newline\n", "   indented\n    code()", "ÿ\x7f", "what is the weather?",
        "Paris", "sum", "Thanks!", "{\"json\": [1, 2]}"]

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string", "description": "the city"},
                                          "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}}}},
    {"type": "function", "function": {"name": "search_web", "description": "Søg på nettet — 検索",
                                      "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}},
]


def _text(rng: random.Random, words: int = 4) -> str:
    return " ".join(rng.choice(HARD) for _ in range(rng.randint(1, words))).strip() or "hi"


def _call_id(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789") for _ in range(9))


def _arguments(rng: random.Random, name: str):
    args = {"get_weather": {"city": _text(rng, 2), "unit": rng.choice(["c", "f"])},
            "add": {"a": rng.randint(-99, 99), "b": round(rng.uniform(-5, 5), 3)},
            "search_web": {"q": _text(rng, 3)}}[name]
    return json.dumps(args, ensure_ascii=rng.random() < 0.5) if rng.random() < 0.7 else args


def _result(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        return json.dumps({"value": rng.randint(0, 99), "note": _text(rng, 2)}, ensure_ascii=rng.random() < 0.5)
    if kind == 1:
        return _text(rng, 3)
    if kind == 2:
        return str(rng.randint(-5, 500))
    return ""


def tool_record(rng: random.Random, with_tools: bool = True) -> dict:
    """One record: 1-3 user turns; with tools, an assistant turn is tool calls (1-3 at once) and
    their results before the answer about half the time."""
    tools = rng.sample(TOOLS, rng.randint(1, len(TOOLS))) if with_tools else None
    messages = [{"role": "system", "content": _text(rng)}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": _text(rng, 6)})
        if tools and rng.random() < 0.6:
            calls = []
            for _ in range(rng.randint(1, 3)):
                name = rng.choice(tools)["function"]["name"]
                calls.append({"id": _call_id(rng), "type": "function",
                              "function": {"name": name, "arguments": _arguments(rng, name)}})
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            results = [{"role": "tool", "tool_call_id": c["id"], "content": _result(rng)} for c in calls]
            rng.shuffle(results)
            messages += results
        messages.append({"role": "assistant", "content": _text(rng, 6)})
    record = {"messages": messages}
    if tools:
        record["tools"] = tools
    return record


def tool_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [tool_record(rng, with_tools=rng.random() < 0.8) for _ in range(n)]
