"""`mistral-qlora env`: what this machine can run (versions, GPUs, attention backends, kernels,
experiment trackers and the optional extras)."""

from __future__ import annotations

import importlib.metadata
import platform

PACKAGES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "deepspeed", "datasets",
            "mistral-common", "triton")
# train.report_to's trackers and the packages of setup.cfg's extras (`pip install mistral-qlora[NAME]`;
# tests/tools/test_env.py keeps this table equal to setup.cfg's, dev left out).
TRACKERS = ("tensorboard", "wandb", "mlflow")
EXTRAS = {"flash": ("flash-attn",), "kernels": ("liger-kernel",), "trackers": ("wandb", "mlflow"), "eval": ("lm-eval",)}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment_report() -> str:
    import torch

    from mistral_qlora import __version__
    from mistral_qlora.plan.backends import kernels_usable, select_attention, usable_backends
    from mistral_qlora.runtime import resolve_dtype

    lines = [f"mistral-qlora {__version__}", f"python {platform.python_version()} ({platform.machine()})"]
    lines += [f"{name:<15} {_version(name)}" for name in PACKAGES]
    lines.append("trackers (train.report_to): " + ", ".join(f"{t} {_version(t)}" for t in TRACKERS))
    lines.append("extras (pip install mistral-qlora[NAME]):")
    for extra, names in EXTRAS.items():
        lines.append(f"  {extra:<13} " + ", ".join(f"{n} {_version(n)}" for n in names))
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda}, {torch.cuda.device_count()} GPU(s):")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"  {i}: {p.name}, {p.total_memory / 2**30:.1f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("GPUs: none (training runs on the CPU in float32)")
    dtype = resolve_dtype("auto")
    lines.append(f"attention backends (model.attention=auto -> {select_attention('auto', dtype)}, "
                 f"dtype {str(dtype).removeprefix('torch.')}):")
    for name, why_not in usable_backends(dtype).items():
        lines.append(f"  {name:<18} {'usable' if why_not is None else 'unavailable: ' + why_not}")
    liger = kernels_usable()
    lines.append(f"kernels (model.kernels=auto -> {'liger' if liger is None else 'none'}): "
                 f"liger {'usable' if liger is None else 'unavailable: ' + liger}")
    return "\n".join(lines)
