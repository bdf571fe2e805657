"""docs/config.md, generated from the run config's schema (config.py): every key with its type,
default and description. `python -m mistral_qlora.tools.config_reference > docs/config.md`
rewrites it; tests/test_config.py fails when the file is stale."""

from __future__ import annotations

import types
import typing

import yaml
from pydantic import BaseModel

from mistral_qlora.config import RunConfig

HEADER = """# The run config

<!-- Generated from src/mistral_qlora/config.py by `python -m mistral_qlora.tools.config_reference > docs/config.md`;
     tests/test_config.py fails when it is stale. Edit the descriptions there, not here. -->

One YAML file (`configs/tiny.yaml`, `configs/mistral-7b-instruct-v0.2.yaml`), validated before anything
runs. `--set key.path=value` overrides any key (the value is read as YAML: `--set train.epochs=1`,
`--set model.sliding_window=null`, `--set "lora.target_modules=[q_proj, v_proj]"`). An unknown key, a
wrong type or a value out of range stops the run with one line that names the key. The defaults are
the embedded default run's: a file that sets nothing trains the tiny model on dataset/story.json.
"""


def type_text(annotation) -> str:
    """A key's type as a reader writes it: `auto | liger | none`, `integer`, `list of strings`."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}`"
                            for v in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_text(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"list of {type_text(typing.get_args(annotation)[0])}s"
    if origin is dict:
        return "mapping"
    if annotation is type(None):
        return "`null`"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "source"
    return {bool: "boolean", int: "integer", float: "number", str: "string"}.get(annotation, str(annotation))


def range_text(field) -> str:
    """`>= 1, <= 1024` from the field's bounds, or ''."""
    parts = []
    for meta in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value:,}")
    return ", ".join(parts)


def default_text(value) -> str:
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _source_tables(name: str, section) -> list[str]:
    """The keys of the items of keys that take a list of sub-sections (data.train's sources)."""
    users: dict = {}
    for key, sub in section.model_fields.items():
        for arg in typing.get_args(sub.annotation):
            for item in typing.get_args(arg) if typing.get_origin(arg) is list else ():
                if isinstance(item, type) and issubclass(item, BaseModel):
                    users.setdefault(item, []).append(f"`{name}.{key}`")
    lines = []
    for item, keys in users.items():
        lines += [f"### A source (an item of {' or '.join(keys)})", "", (item.__doc__ or "").strip(), "",
                  "| key | type | default | what it does |", "|---|---|---|---|"]
        for leaf, f in item.model_fields.items():
            lines.append(_row(leaf, f, "required" if f.is_required() else default_text(f.default)))
        lines.append("")
    return lines


def _row(key: str, field, default: str) -> str:
    """One table row: the key, its type with its bounds, its default, its description."""
    kind = type_text(field.annotation)
    bounds = range_text(field)
    kind += f" ({bounds})" if bounds else ""
    return f"| `{key}` | {kind} | {default} | {field.description} |"


def reference_markdown() -> str:
    lines = [HEADER]
    for name, field in RunConfig.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            lines += [f"## `{name}`", "", (section.__doc__ or "").strip(), "",
                      "| key | type | default | what it does |", "|---|---|---|---|"]
            for key, sub in section.model_fields.items():
                lines.append(_row(f"{name}.{key}", sub, default_text(sub.default)))
            lines.append("")
            lines += _source_tables(name, section)
        else:
            lines += [f"## `{name}`", "", "| key | type | default | what it does |", "|---|---|---|---|",
                      f"| `{name}` | {type_text(field.annotation)} | {default_text(field.default)} | "
                      f"{field.description} |", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown(), end="")
