"""`prepare` and long records: data.max_seq_len beyond the model's context refused in one line,
and the count of records longer than the plan fits on this machine's GPU (on the CPU: it cannot
tell, in one line)."""

import json

import pytest
from testkit import ROOT, story_records
from testkit.plan import MISTRAL_7B

from mistral_qlora.cli import main
from mistral_qlora.config import RunConfig
from mistral_qlora.plan.context import longest_row
from mistral_qlora.runtime import GIB
from mistral_qlora.tools.prepare import fit_line


def cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_prepare_refuses_max_seq_len_beyond_the_context_and_says_it_cannot_tell_the_fit_on_the_cpu(tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(story_records(20)))
    base = ("prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={data}")
    code, out, err = cli(capsys, *base, "--set", "data.max_seq_len=40000", "--set", "data.tokens_per_row=40000")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "data.max_seq_len=40000" in err and "32,768" in err
    code, out, err = cli(capsys, *base, "--set", "data.max_seq_len=40000", "--set", "data.tokens_per_row=40000",
                         "--set", "model.rope_scaling={type: linear, factor: 2}")
    assert code == 0, err
    (line,) = [x for x in out.splitlines() if x.startswith("records longer than the GPU fits")]
    assert "cannot tell without a GPU" in line


def test_fit_line_counts_the_records_longer_than_the_planned_row():
    cfg = RunConfig.model_validate({"model": {"kernels": "liger"}, "data": {"tokens_per_row": 8192,
                                                                            "max_seq_len": 4096}})
    fits = longest_row(cfg, MISTRAL_7B, 2, "liger", 16 * GIB)
    line = fit_line(cfg, MISTRAL_7B, [1000, fits, fits + 1, 10**6], 16 * GIB, 2, "liger")
    assert f"({fits:,} tokens a row in 16.0 GiB usable" in line and line.endswith(": 2 of 4")
    assert "tokens_per_row" in fit_line(cfg.model_copy(update={"data": cfg.data.model_copy(
        update={"tokens_per_row": fits + 256})}), MISTRAL_7B, [1000], 16 * GIB, 2, "liger")
