"""Bad input at the command line: one clear line on stderr, exit code 2, nothing written."""

import json
import os
import subprocess
import sys

import pytest

from mistral_qlora.cli import main

from testkit import ROOT, run_cli, story_records


def cli(capsys, *args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def _train_args(tmp_path, data, *extra):
    return ["train", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={data}",
            "--set", f"output_dir={tmp_path / 'out'}", *extra]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_DATA = {
    "malformed.json": ('[{"text": "<s>[INST] a [/INST] b </s>"},\n {"text": }]', r"malformed.json:2:\d+: malformed JSON"),
    "bad.jsonl": ('{"text": "<s>[INST] a [/INST] b </s>"}\n{"text": "x"\n', r"bad.jsonl:2:\d+: bad JSON line"),
    "noinst.json": (json.dumps([{"text": "<s>[INST] a [/INST] b </s>"}, {"text": "plain words"}]),
                    r"noinst.json record 1 \(0-based\): text has no '\[INST\] ... \[/INST\]' pair: 'plain words'"),
    "nonstring.json": (json.dumps([{"text": ["a"]}]), r"nonstring.json record 0 \(0-based\): 'text' must be a string, got list"),
    "empty.json": ("[]", r"empty.json: the dataset is empty"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_is_one_line_exit_2_nothing_written(tmp_path, capsys, name):
    text, pattern = BAD_DATA[name]
    data = _write(tmp_path, name, text)
    code, out, err = cli(capsys, *_train_args(tmp_path, data))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mistral-qlora: error: ")
    assert __import__("re").search(pattern, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override, pattern", [
    ("train.lerning_rate=1e-4", "unknown key 'train.lerning_rate'; did you mean 'train.learning_rate'?"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be >= 1 (got 0)"),
    ("lora.dropout=abc", "lora.dropout: "),
    ("model.name_or_path=/no/such/model", "model.name_or_path='/no/such/model': no such folder"),
    ("data.train=/no/such/file.json", "/no/such/file.json: data file not found"),
])
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path, capsys, override, pattern):
    data = _write(tmp_path, "ok.json", json.dumps(story_records(8)))
    code, out, err = cli(capsys, *_train_args(tmp_path, data, "--set", override))
    assert code == 2
    assert err.count("\n") == 1 and pattern in err
    assert not (tmp_path / "out").exists()


def test_prepare_reports_and_writes_nothing(tmp_path, capsys):
    data = _write(tmp_path, "ok.json", json.dumps(story_records(30)))
    code, out, err = cli(capsys, "prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={data}",
                         "--set", f"output_dir={tmp_path / 'out'}")
    assert code == 0
    assert "records: 27 train, 3 eval" in out
    assert "packing:" in out and "efficiency" in out and "steps per epoch" in out
    assert not (tmp_path / "out").exists()


def test_prepare_counts_steps_for_the_processes_the_run_will_use(tmp_path, capsys):
    import re

    data = _write(tmp_path, "ok.json", json.dumps(story_records(120)))
    args = ("prepare", str(ROOT / "configs/tiny.yaml"), "--set", f"data.train={data}", "--set", "data.tokens_per_row=64",
            "--set", "data.max_seq_len=64")

    def steps(*extra):
        code, out, _ = cli(capsys, *args, *extra)
        assert code == 0
        rows = int(re.search(r"packing: (\d+) rows", out).group(1))
        m = re.search(r"steps per epoch: (\d+) \((\d+) rows per optimizer step\)", out)
        return rows, int(m.group(1)), int(m.group(2))

    rows, one, per_step = steps()
    assert per_step == 1 and one == rows > 4
    assert steps("--nproc", "2", "--nnodes", "2")[1:] == (-(-rows // 4), 4)
    code, _, err = cli(capsys, *args, "--nproc", "0")
    assert code == 2 and "--nproc and --nnodes must be at least 1" in err


def test_finished_run_is_not_overwritten_without_flag(tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "summary.json").write_text("{}")
    data = _write(tmp_path, "ok.json", json.dumps(story_records(8)))
    code, out, err = cli(capsys, *_train_args(tmp_path, data))
    assert code == 2 and "holds a finished run; pass --overwrite" in err
    assert (out_dir / "summary.json").read_text() == "{}"
    assert sorted(p.name for p in out_dir.iterdir()) == ["summary.json"]


def test_subprocess_error_has_no_traceback_unless_debug_and_exits_2_either_way(tmp_path):
    line = "mistral-qlora: error: --set train.epochs=-1: train.epochs: must be > 0 (got -1)"
    args = ["train", "configs/tiny.yaml", "--set", "train.epochs=-1", "--set", f"output_dir={tmp_path / 'o'}"]
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.strip() == line
    # --debug before or after the command: the traceback, then the same line, and still exit 2
    for argv in (["--debug", *args], [*args, "--debug"]):
        proc = run_cli(*argv)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" in proc.stderr and proc.stderr.strip().endswith(line)


@pytest.mark.parametrize("command", ["train CONFIG", "prepare CONFIG", "generate --prompt x", "merge --adapter a --output o",
                                     "export --adapter a --output o", "env"])
def test_debug_is_taken_before_or_after_every_command(command):
    from mistral_qlora.cli import build_parser

    argv = command.replace("CONFIG", "c.yaml").split()
    parser = build_parser()
    assert parser.parse_args(argv).debug is False
    assert parser.parse_args(["--debug", *argv]).debug is True
    assert parser.parse_args([*argv, "--debug"]).debug is True


def test_bad_config_for_train_fails_before_torch_is_imported(tmp_path):
    """The config is checked first: a mistake costs a moment, not the seconds torch takes to load."""
    code = ("import sys\nfrom mistral_qlora.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as exc:\n"
            "    print(exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    for argv in (["train", "configs/tiny.yaml", "--set", "train.epochs=0"], ["train", str(tmp_path)],
                 ["prepare", "configs/tiny.yaml", "--set", "lora.rank=8"]):
        proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, timeout=300)
        assert proc.stdout.split() == ["2", "False", "False"], (argv, proc.stdout, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "mistral-qlora: error: " in proc.stderr


@pytest.mark.parametrize("command", ["train", "prepare", "generate", "merge", "export", "env"])
def test_every_option_of_the_commands_has_help(command):
    import argparse

    from mistral_qlora.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [a.option_strings or a.dest for a in sub.choices[command]._actions if not a.help]
    assert not missing, f"{command}: no help for {missing}"


def test_env_names_the_attention_backend(capsys):
    code, out, err = cli(capsys, "env")
    assert code == 0
    assert "attention backends (model.attention=auto -> " in out
    assert "transformers" in out and "bitsandbytes" in out


@pytest.mark.parametrize("of,suffix", [("host", " GiB (host RSS)"), ("gpu", " GiB")])
def test_summary_line_gives_the_peak_memory_and_what_it_is_of(capsys, of, suffix):
    from mistral_qlora.cli import _print_summary

    _print_summary("out", {"steps": 3, "runtime_seconds": 2.0, "attention_backend": "sdpa", "strategy": "single",
                           "world_size": 1, "initial_eval_loss": 2.0, "final_eval_loss": 1.5,
                           "tokens_per_second": 100.0, "mfu": None, "peak_memory_gib": 1.25, "peak_memory_of": of})
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "peak memory" in line]
    assert line.endswith(f"peak memory 1.25{suffix}")


PREPARE_WITH_LOW_THRESHOLDS = (
    "import sys\n"
    "import mistral_qlora.data.sources as sources, mistral_qlora.data.token_cache as token_cache\n"
    "token_cache.PROGRESS_RECORDS = 10  # every build of this test's data is long enough for a bar\n"
    "sources.PROGRESS_BYTES = 1\n"
    "from mistral_qlora.cli import main\n"
    "main(sys.argv[1:])\n")


def _prepare_stderr(tmp_path, name: str, terminal: bool) -> str:
    """`prepare` on 200 records in a fresh process, its stderr a pipe or (terminal) a pseudo-terminal."""
    import os
    import subprocess
    import sys

    data = _write(tmp_path, "big.jsonl", "".join(json.dumps(r) + "\n" for r in story_records(200)))
    cmd = [sys.executable, "-c", PREPARE_WITH_LOW_THRESHOLDS, "prepare", str(ROOT / "configs/tiny.yaml"),
           "--set", f"data.train={data}", "--set", f"data.cache_dir={tmp_path / name}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    if not terminal:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stderr.decode(errors="replace")
    import pty

    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal's width for the bars
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=600) == 0
    return b"".join(chunks).decode(errors="replace")


def test_prepare_draws_progress_bars_on_a_terminal_only(tmp_path):
    on_a_terminal = _prepare_stderr(tmp_path, "tty-cache", terminal=True)
    assert "\r" in on_a_terminal and "%|" in on_a_terminal  # the build's bar, where it may be drawn
    in_a_pipe = _prepare_stderr(tmp_path, "pipe-cache", terminal=False)
    assert "\r" not in in_a_pipe and "%|" not in in_a_pipe, in_a_pipe[-2000:]
