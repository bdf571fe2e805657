"""`mistral-qlora evaluate` and eval.tasks: lm-eval's scores of our loaded model, before and after the adapter."""

import json

import pytest

from testkit import ROOT, story_records

pytest.importorskip("lm_eval")

TASKS = ROOT / "dataset" / "tasks"
# A continuous score (per-document log-likelihood -> perplexity), so "the adapter changes the scores"
# cannot pass or fail by a tie of a few right/wrong answers.
ROLLING_TASK = """\
task: story_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "story_text.jsonl"
    data.write_text("".join(json.dumps({"text": r["text"][4:200]}) + "\n" for r in story_records(3)))
    (folder / "story_text.yaml").write_text(ROLLING_TASK.format(data=data))
    return folder


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A LoRA adapter on the tiny model with random (non-zero) A and B, saved as a run saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mistral_qlora.model.adapter import record_base_model
    from mistral_qlora.model.base import resolve_model_path
    from mistral_qlora.model.tokenizer import load_tokenizer

    path = resolve_model_path("tiny-random-mistral")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    folder = tmp_path_factory.mktemp("run") / "adapter"
    model.save_pretrained(str(folder))
    load_tokenizer(path).save_pretrained(str(folder))
    record_base_model(folder, "tiny-random-mistral")
    return folder


@pytest.mark.slow  # a model scored through lm-eval, or lm-eval's whole task index
def test_evaluate_writes_before_after_table_and_the_adapter_changes_the_scores(adapter, tasks_dir, capsys):
    from mistral_qlora.cli import main

    with pytest.raises(SystemExit) as done:
        main(["evaluate", "--adapter", str(adapter), "--tasks", "story_text", "--limit", "2",
              "--include-path", str(tasks_dir), "--no-chat-template"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    table = json.loads((adapter.parent / "eval" / "results.json").read_text())
    assert table["columns"] == ["before", "after"] and table["chat_template"] is None
    rows = {r["metric"]: r for r in table["rows"]}
    assert set(rows) >= {"word_perplexity", "bits_per_byte"}
    for r in rows.values():
        assert r["n"] == 2 and r["before"] > 0 and r["after"] > 0
        assert r["after"] != pytest.approx(r["before"], rel=1e-3)  # the adapter is on for `after` only
        assert r["diff"] == pytest.approx(r["after"] - r["before"])
    md = (adapter.parent / "eval" / "results.md").read_text()
    assert "| story_text | bits_per_byte | 2 |" in md and "chat template: none (plain text)" in md
    assert md.strip() in out  # printed as written
    assert "requests/s" in out and "elapsed" in out


@pytest.mark.slow  # a model scored through lm-eval, or lm-eval's whole task index
def test_shipped_story_tasks_score_with_the_chat_template(adapter, tmp_path):
    """dataset/tasks: the multiple-choice task (acc, acc_norm, lm-eval's standard errors) through the
    run's template (the tiny tokenizer has none: mistral-v1 renders the turns)."""
    from mistral_qlora.run.task_eval import TaskSpec
    from mistral_qlora.tools.evaluate import evaluate

    spec = TaskSpec(["story_mc"], limit=2, include_path=str(TASKS))
    table, md, out = evaluate(str(adapter), None, spec, output=str(tmp_path / "eval"))
    assert out == tmp_path / "eval" and (out / "results.md").read_text() == md
    rows = {r["metric"]: r for r in table["rows"]}
    assert set(rows) == {"acc", "acc_norm"}
    for r in rows.values():
        assert r["before_stderr"] is not None and 0 <= r["before"] <= 1 and 0 <= r["after"] <= 1
    assert table["chat_template"].startswith("mistral-v1")
    assert table["speed"]["after"]["requests"] == 2 * 4  # two questions, four answers each


@pytest.mark.slow  # a model scored through lm-eval, or lm-eval's whole task index
def test_scores_equal_lm_evals_own_hflm_on_the_same_16bit_model(adapter, tasks_dir, tmp_path):
    """Our load (the adapter on a 16-bit base, wrapped in HFLM) against lm-eval loading the merged
    folder itself: the same numbers within float32's rounding."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from mistral_qlora.run.task_eval import TaskSpec
    from mistral_qlora.tools.evaluate import evaluate
    from mistral_qlora.tools.merge import merge_adapter

    spec = TaskSpec(["story_text", "story_mc"], limit=2, include_path=[str(tasks_dir), str(TASKS)],
                    chat_template=False)
    ours, _, _ = evaluate(str(adapter), None, spec, output=str(tmp_path / "eval"), bits=16)
    merged = merge_adapter(str(adapter), str(tmp_path / "merged"), dtype="fp32")
    manager = TaskManager(include_path=[str(tasks_dir), str(TASKS)], include_defaults=False)
    theirs = simple_evaluate(model=HFLM(pretrained=str(merged), device="cpu", dtype="float32"),
                             tasks=["story_text", "story_mc"], limit=2, task_manager=manager)["results"]
    assert len(ours["rows"]) == 4
    for r in ours["rows"]:
        assert r["after"] == pytest.approx(theirs[r["task"]][f"{r['metric']},none"], rel=1e-4, abs=1e-6)


def _fails(capsys, *argv) -> str:
    from mistral_qlora.cli import main

    with pytest.raises(SystemExit) as done:
        main(["evaluate", *argv])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mistral-qlora: error: ")
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Every refusal happens before the base loads."""
    import mistral_qlora.tools.evaluate as ev

    def refuse(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(ev, "load_base_model", refuse)


def test_bad_inputs_fail_in_one_line_before_the_model_loads(adapter, tmp_path, capsys, no_model_load, monkeypatch):
    common = ["--adapter", str(adapter), "--include-path", str(TASKS)]
    assert "--limit 0: must be at least 1" in _fails(capsys, *common, "--tasks", "story_mc", "--limit", "0")
    err = _fails(capsys, "--adapter", str(adapter), "--tasks", "story_mc", "--include-path", str(tmp_path / "nope"))
    assert "--include-path" in err and "no such folder" in err

    lost = tmp_path / "lost" / "adapter"
    lost.mkdir(parents=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (lost / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(tmp_path / "gone")}))
    err = _fails(capsys, "--adapter", str(lost), "--tasks", "story_mc", "--include-path", str(TASKS))
    assert "its base model" in err and "is not here" in err and "--model" in err

    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # as if not installed
    err = _fails(capsys, *common, "--tasks", "story_mc")
    assert "pip install 'mistral-qlora[eval]'" in err


@pytest.mark.slow  # a model scored through lm-eval, or lm-eval's whole task index
def test_unknown_task_and_unreachable_hub_task_fail_in_one_line(adapter, capsys, no_model_load, monkeypatch):
    err = _fails(capsys, "--adapter", str(adapter), "--tasks", "story_mc,story_mcq", "--include-path", str(TASKS))
    assert "unknown task 'story_mcq'" in err and "closest: story_mc" in err

    # arc_easy reads the hub dataset allenai/ai2_arc: no network here and (in a fresh cache) nothing cached
    monkeypatch.setenv("HF_DATASETS_CACHE", str(adapter.parent / "empty-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(adapter.parent / "empty-hub"))
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against no network
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", adapter.parent / "empty-cache")
    err = _fails(capsys, "--adapter", str(adapter), "--tasks", "arc_easy")
    assert "task 'arc_easy'" in err and "'allenai/ai2_arc'" in err and "make it local" in err


def test_story_task_files_are_built_deterministically_from_story_json(tmp_path):
    from mistral_qlora.tools.story_tasks import write_story_tasks

    written = write_story_tasks(ROOT / "dataset" / "story.json", tmp_path)
    for path in written:  # the committed files are what the builder writes
        assert path.read_text() == (TASKS / path.name).read_text()
    mc = [json.loads(line) for line in (tmp_path / "story_mc.jsonl").read_text().splitlines()]
    records = json.loads((ROOT / "dataset" / "story.json").read_text())
    assert len(mc) == len(records)
    for row in mc:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4
    labels = {row["label"] for row in mc}
    assert labels == {0, 1, 2, 3}  # the right answer is not always in one place


@pytest.mark.slow  # a model scored through lm-eval, or lm-eval's whole task index
def test_eval_tasks_in_a_run_go_to_summary_and_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from mistral_qlora.cli import _print_summary
    from mistral_qlora.config import load_config
    from mistral_qlora.train import run_training

    data = tmp_path / "qa.json"
    data.write_text(json.dumps(story_records(16)))
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"data.train={data}", "data.max_seq_len=128", "data.tokens_per_row=128", "train.max_steps=2",
        "train.eval_steps=1000", "eval.samples=0", "train.report_to=[tensorboard]", "eval.tasks=[story_mc]",
        "eval.tasks_limit=2", f"eval.include_path={TASKS}", f"output_dir={tmp_path / 'run'}"])
    summary = run_training(cfg)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["tasks"] == summary["tasks"]
    rows = {r["metric"]: r for r in on_disk["tasks"]["rows"]}
    assert set(rows) == {"acc", "acc_norm"} and rows["acc"]["n"] == 2
    assert {"before", "after", "diff"} <= set(rows["acc"])

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    tags = [t for t in events.Tags()["scalars"] if "tasks/story_mc/acc/" in t]
    assert tags, events.Tags()["scalars"]
    assert all(events.Scalars(t)[-1].step == summary["steps"] for t in tags)  # at the last step

    _print_summary(str(tmp_path / "run"), summary)
    assert "| story_mc | acc | 2 |" in capsys.readouterr().out
