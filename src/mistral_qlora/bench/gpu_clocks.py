"""The GPU's SM clock and power while something runs, sampled from `nvidia-smi` in the background.

Why the bench records them: a GPU runs at its boost clock only while it stays under its power
limit. A recipe whose GEMMs keep the card busy can hit that cap and run the whole time at a lower
clock than a recipe that leaves the card idle part of the time, so a ratio between two recipes on
one card is partly a ratio of their clocks, and a step profiled after an idle second runs faster
than the same step in a long run. The report shows the clock each recipe ran at and what held it
back.

`nvidia-smi` ships with the NVIDIA driver (also inside containers run with the NVIDIA toolkit);
where it is missing or fails, the sampler reports nothing and the caller carries on.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import threading

QUERY = ("clocks.sm", "clocks.max.sm", "power.draw", "power.limit", "clocks_throttle_reasons.active")
INTERVAL_MS = 200

# NVML's clock-event ("throttle") reason bits that slow the clock down, by name.
SLOWDOWNS = {
    0x4: "power cap",
    0x8: "hardware slowdown",
    0x20: "thermal (software)",
    0x40: "thermal (hardware)",
    0x80: "power brake",
}


def nvidia_smi_command(gpu: str | None, interval_ms: int = INTERVAL_MS) -> list[str] | None:
    """The sampling command for one GPU (an index or a `GPU-<uuid>`), or None without nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    command = [exe, f"--query-gpu={','.join(QUERY)}", "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}"]
    return command + ([f"--id={gpu}"] if gpu is not None else [])


def torch_gpu_id(device) -> str | None:
    """nvidia-smi's name for a torch CUDA device: its UUID (CUDA_VISIBLE_DEVICES renumbers indices)."""
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        return str(index) if torch.cuda.device_count() > 1 else None
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


def parse_samples(lines) -> list[dict]:
    """nvidia-smi's CSV lines -> one dict per line with the fields of QUERY; malformed lines skipped."""
    samples = []
    for line in lines:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != len(QUERY):
            continue
        sm, sm_max, power, limit, reasons = parts
        try:
            bits = int(reasons, 16)
        except ValueError:
            bits = None
        if _number(sm) is None:
            continue
        samples.append({"sm_mhz": _number(sm), "sm_max_mhz": _number(sm_max), "power_w": _number(power),
                        "power_limit_w": _number(limit), "reasons": bits})
    return samples


def summarize(samples: list[dict]) -> dict | None:
    """Median clock and power over the samples, the card's maximum clock and power limit, and the
    share of samples in which each slowdown held the clock back. None without samples."""
    if not samples:
        return None

    def median(key):
        values = [s[key] for s in samples if s[key] is not None]
        return round(statistics.median(values), 1) if values else None

    clocks = [s["sm_mhz"] for s in samples]
    with_reasons = [s["reasons"] for s in samples if s["reasons"] is not None]
    slowed = {}
    for bit, name in SLOWDOWNS.items():
        n = sum(1 for r in with_reasons if r & bit)
        if n:
            slowed[name] = round(n / len(with_reasons), 3)
    return {
        "samples": len(samples),
        "sm_clock_mhz": median("sm_mhz"),
        "sm_clock_min_mhz": min(clocks),
        "sm_clock_max_mhz": median("sm_max_mhz"),
        "power_w": median("power_w"),
        "power_limit_w": median("power_limit_w"),
        "slowed_by": slowed,
    }


class ClockSampler:
    """`with ClockSampler(command) as s: ...`, then `s.summary`: what the GPU ran at meanwhile
    (`s.samples`: the samples themselves, for pooling several runs).

    `command` prints one CSV line of QUERY's fields per sample until it is stopped (see
    `nvidia_smi_command`); None, or a command that fails, gives `summary` None."""

    def __init__(self, command: list[str] | None):
        self.command = command
        self.samples: list[dict] = []
        self.summary: dict | None = None
        self._proc: subprocess.Popen | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None

    def __enter__(self) -> "ClockSampler":
        if self.command:
            try:
                self._proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                              text=True)
            except OSError:
                self._proc = None
        if self._proc is not None:
            # Read as the lines come: a long run would otherwise fill the pipe and stall the sampler.
            self._reader = threading.Thread(target=self._lines.extend, args=(self._proc.stdout,), daemon=True)
            self._reader.start()
        return self

    def __exit__(self, *exc) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._reader.join(timeout=5)
        proc.stdout.close()
        self.samples = parse_samples(self._lines)
        self.summary = summarize(self.samples)


def gpu_sampler(device) -> ClockSampler:
    """A sampler for a torch device: nvidia-smi on that CUDA GPU, nothing elsewhere."""
    if getattr(device, "type", None) != "cuda":
        return ClockSampler(None)
    return ClockSampler(nvidia_smi_command(torch_gpu_id(device)))


def describe(summary: dict | None) -> str:
    """'<clock> MHz of <max>, <power> W of <limit> (power cap <share>)', or 'n/a'."""
    if not summary:
        return "n/a"
    text = f"{summary['sm_clock_mhz']:,.0f} MHz"
    if summary.get("sm_clock_max_mhz"):
        text += f" of {summary['sm_clock_max_mhz']:,.0f}"
    if summary.get("power_w") is not None:
        text += f", {summary['power_w']:,.0f} W"
        if summary.get("power_limit_w"):
            text += f" of {summary['power_limit_w']:,.0f}"
    if summary.get("slowed_by"):
        text += " (" + ", ".join(f"{name} {share:.0%}" for name, share in summary["slowed_by"].items()) + ")"
    return text
