"""The GPU clock sampler: nvidia-smi's CSV parsed and summarised, the background process started
and stopped, and nothing reported (no error) where there is no nvidia-smi."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from mistral_qlora.bench import gpu_clocks as G

# Lines as nvidia-smi prints them on an H200 at its power cap (2026-11-30), then idle.
CAPPED = [
    "1560, 1980, 691.16, 700.00, 0x0000000000000004",
    "1545, 1980, 688.50, 700.00, 0x0000000000000004",
    "1635, 1980, 693.22, 700.00, 0x0000000000000004",
    "1980, 1980, 433.67, 700.00, 0x0000000000000000",
]


def test_parse_and_summarize_nvidia_smi_lines():
    samples = G.parse_samples(CAPPED + ["garbage", "[N/A], 1980, 10.0, 700.00, 0x0", ""])
    assert len(samples) == 4 and samples[0] == {"sm_mhz": 1560.0, "sm_max_mhz": 1980.0, "power_w": 691.16,
                                                 "power_limit_w": 700.0, "reasons": 4}
    summary = G.summarize(samples)
    assert summary["samples"] == 4
    assert summary["sm_clock_mhz"] == 1597.5 and summary["sm_clock_min_mhz"] == 1545.0
    assert summary["sm_clock_max_mhz"] == 1980.0 and summary["power_limit_w"] == 700.0
    assert summary["power_w"] == pytest.approx(689.8, abs=0.05)  # (688.50 + 691.16) / 2
    assert summary["slowed_by"] == {"power cap": 0.75}
    assert G.describe(summary) == "1,598 MHz of 1,980, 690 W of 700 (power cap 75%)"
    assert G.summarize([]) is None and G.describe(None) == "n/a"


def test_fields_nvidia_smi_cannot_read_are_left_out():
    (sample,) = G.parse_samples(["1410, 1410, [N/A], [N/A], [Not Supported]"])
    assert sample["power_w"] is None and sample["reasons"] is None
    summary = G.summarize([sample])
    assert summary["power_w"] is None and summary["slowed_by"] == {}
    assert G.describe(summary) == "1,410 MHz of 1,410"


def _fake_smi(tmp_path, lines) -> list[str]:
    """A stand-in for `nvidia-smi --loop-ms`: prints its lines, then waits to be stopped."""
    script = tmp_path / "fake_smi.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        for line in {lines!r}:
            print(line, flush=True)
        time.sleep(60)
    """))
    return [sys.executable, str(script)]


def test_sampler_runs_the_command_in_the_background_and_stops_it(tmp_path):
    import time

    sampler = G.ClockSampler(_fake_smi(tmp_path, CAPPED[:3]))
    started = time.monotonic()
    with sampler:
        time.sleep(1.0)  # the work being measured
        proc = sampler._proc
        assert proc is not None and proc.poll() is None
    assert proc.poll() is not None  # stopped, not left behind
    assert time.monotonic() - started < 10
    assert len(sampler.samples) == 3 and sampler.summary["slowed_by"] == {"power cap": 1.0}


def test_sampler_without_nvidia_smi_reports_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(G.shutil, "which", lambda name: None)
    assert G.nvidia_smi_command("0") is None
    with G.ClockSampler(None) as sampler:
        pass
    assert sampler.summary is None and sampler.samples == []
    with G.ClockSampler([str(tmp_path / "no-such-program")]) as sampler:  # cannot start: no error either
        pass
    assert sampler.summary is None
    with G.gpu_sampler(torch.device("cpu")) as sampler:
        pass
    assert sampler.summary is None


def test_nvidia_smi_command_names_the_gpu(monkeypatch):
    monkeypatch.setattr(G.shutil, "which", lambda name: "/usr/bin/nvidia-smi")
    command = G.nvidia_smi_command("GPU-1234", interval_ms=100)
    assert command[0] == "/usr/bin/nvidia-smi" and "--id=GPU-1234" in command and "--loop-ms=100" in command
    assert f"--query-gpu={','.join(G.QUERY)}" in command and "--format=csv,noheader,nounits" in command


def test_bench_report_prints_each_recipes_clock(tmp_path):
    from mistral_qlora.bench.options import BenchOptions
    from mistral_qlora.bench.report import format_report
    from mistral_qlora.bench.run import run_bench

    report = run_bench(BenchOptions(median=48, max_len=160, min_len=16, sequences=200, tokens_per_row=320,
                                    warmup=1, timed_rows=1, lora_r=4, recipes=["packed+sdpa"], repeats=1))
    (r,) = report["results"]
    assert "gpu_clocks" in r
    assert "SM clock" not in format_report(report) or torch.cuda.is_available()
    r["gpu_clocks"] = G.summarize(G.parse_samples(CAPPED[:3]))
    table = format_report(report)
    assert "the GPU's SM clock and power over the timed passes" in table
    assert "packed+sdpa" in table.split("SM clock")[1] and "(power cap 100%)" in table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampler_reads_this_gpu():
    import time

    with G.gpu_sampler(torch.device("cuda")) as sampler:
        time.sleep(1.0)
    summary = sampler.summary
    assert summary is not None and summary["samples"] >= 2, "nvidia-smi gave no samples for this GPU"
    assert 0 < summary["sm_clock_min_mhz"] <= summary["sm_clock_max_mhz"]


def test_sampler_keeps_reading_past_a_full_pipe(tmp_path):
    """A long run prints more than a pipe holds (64 KiB): every sample is still read."""
    import time

    script = tmp_path / "chatty_smi.py"
    script.write_text("import time\nfor i in range(5000):\n    print('1500, 1980, 690.0, 700.0, 0x4', flush=True)\n"
                      "print('1980, 1980, 400.0, 700.0, 0x0', flush=True)\ntime.sleep(60)\n")
    with G.ClockSampler([sys.executable, str(script)]) as sampler:
        time.sleep(3.0)  # 160 KB printed in well under a second; a sampler that does not read blocks at 64 KiB
    assert len(sampler.samples) == 5001 and sampler.summary["slowed_by"] == {"power cap": round(5000 / 5001, 3)}
