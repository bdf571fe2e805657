"""Resuming on another number of processes: the global batch kept through train.grad_accum, or a
one-line refusal; the global order of the rows independent of the world size."""

import json

import pytest

from mistral_qlora.config import RunConfig
from mistral_qlora.errors import UserError
from mistral_qlora.run.elastic import adapt_to_world_size, describe
from mistral_qlora.run.sampler import GlobalOrderSampler


def _checkpoint(tmp_path, world_size, micro_batch_size=1, grad_accum=1):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / "run.json").write_text(json.dumps({"world_size": world_size, "micro_batch_size": micro_batch_size,
                                               "grad_accum": grad_accum}))
    return ckpt


def _cfg(**train):
    return RunConfig.model_validate({"train": train})


def test_grad_accum_changes_to_keep_the_global_batch(tmp_path):
    cfg = _cfg(micro_batch_size=2, grad_accum=3)
    record = adapt_to_world_size(cfg, _checkpoint(tmp_path, 4, 2, 3), 2)  # 2 x 3 x 4 = 24 rows = 2 x 6 x 2
    assert cfg.train.grad_accum == 6
    assert record == {"step": 4, "checkpoint": "checkpoint-4", "from_world_size": 4, "to_world_size": 2,
                      "changed": {"train.grad_accum": [3, 6]}}
    assert "saved by 4 process(es) on 2: train.grad_accum 3 -> 6" in describe(record)


def test_the_same_world_size_changes_nothing(tmp_path):
    cfg = _cfg(grad_accum=2)
    record = adapt_to_world_size(cfg, _checkpoint(tmp_path, 2, 1, 2), 2)
    assert cfg.train.grad_accum == 2 and record["changed"] == {}


def test_a_global_batch_that_cannot_be_kept_is_refused_in_one_line(tmp_path):
    cfg = _cfg(micro_batch_size=1, grad_accum=1)
    with pytest.raises(UserError) as e:
        adapt_to_world_size(cfg, _checkpoint(tmp_path, 2), 3)
    message = str(e.value)
    assert "\n" not in message and "global batch of 2 rows" in message and "use 1, 2 processes" in message
    assert cfg.train.grad_accum == 1


def test_the_rows_of_each_global_batch_do_not_depend_on_the_world_size():
    """The sampler's order is cut into micro-batches, micro-batch j to rank j mod W: the rows of
    step s are the order's [s*B, (s+1)*B) whatever W and the accumulation that make B."""
    order = GlobalOrderSampler(rows=23, global_batch=4, seed=7)
    assert len(order) == 20 and order.steps_per_epoch == 5
    assert list(order) == GlobalOrderSampler(23, 4, 7).order(0)
    order.set_epoch(1)
    assert list(order) != order.order(0) and sorted(set(order.order(1))) == sorted(order.order(1))
    with pytest.raises(UserError, match="fewer than one global batch"):
        GlobalOrderSampler(rows=3, global_batch=4, seed=0)


def test_a_config_written_for_the_new_world_size_resumes_a_checkpoint_whose_grad_accum_was_adapted(tmp_path):
    """2 processes (grad_accum 1) -> 1 process saved grad_accum 2 -> back on 2 with the same config."""
    from mistral_qlora.run.checkpoints import check_fingerprint

    ckpt = _checkpoint(tmp_path, world_size=1, micro_batch_size=1, grad_accum=2)
    check_fingerprint(ckpt, {"world_size": 2, "micro_batch_size": 1, "grad_accum": 1}, force=False, warn=print)
    cfg = _cfg(micro_batch_size=1, grad_accum=1)
    record = adapt_to_world_size(cfg, ckpt, 2)
    assert cfg.train.grad_accum == 1 and record["changed"] == {}
    assert record["from_world_size"] == 1 and record["to_world_size"] == 2
    cfg = _cfg(micro_batch_size=1, grad_accum=4)  # any grad_accum in the config: the global batch is the checkpoint's
    assert adapt_to_world_size(cfg, ckpt, 2)["changed"] == {"train.grad_accum": [4, 1]}
    cfg = _cfg(micro_batch_size=1, grad_accum=4)  # --force: the user's new geometry
    assert adapt_to_world_size(cfg, ckpt, 2, force=True)["changed"] == {} and cfg.train.grad_accum == 4
