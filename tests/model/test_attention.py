"""Attention on packed rows: exact, isolated, windowed. CPU, float32, the embedded tiny model.

The tiny model has GQA (8 query heads, 2 KV heads) and a 64-token sliding window; the sequences
here are longer than the window, so both the isolation and the window are exercised. `varlen`'s
CUDA kernel is replaced on the CPU by `reference_varlen_attn`, the same semantics in plain
PyTorch; tests/test_attention_gpu.py checks the real kernel against it and against eager.
"""

from __future__ import annotations

import pytest
import torch

from mistral_qlora.data.collator import PackedCollator, PaddedCollator
from mistral_qlora.data.tokenize import IGNORE_INDEX
from mistral_qlora.model import attention as A
from mistral_qlora.plan import backends as B

from testkit import layer_plan, load_tiny_base

LENGTHS = [150, 90, 33, 200]  # three of four longer than the 64-token window
WINDOW = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_path():
    from testkit import tiny_path

    return tiny_path()


@pytest.fixture()
def reference_kernel(monkeypatch):
    """`varlen` on the CPU: the plain-PyTorch kernel in place of the CUDA one."""
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, **kw):
        calls.append({"cu_q": cu_q, "cu_k": cu_k, "max_q": max_q, "max_k": max_k, **kw,
                      "heads": (q.shape[1], k.shape[1])})
        return A.reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **kw)

    monkeypatch.setattr(A, "_VARLEN_KERNEL", kernel)
    monkeypatch.setattr(A, "_GQA", "flag")
    A.register_varlen()
    return calls


_MODELS = {}


def _model(path, impl, window=WINDOW):
    """The tiny model in float32 with this attention; one instance per backend, its window set
    on the shared config (every layer reads it at forward time)."""
    if impl not in _MODELS:
        from transformers import AutoModelForCausalLM

        if impl == "torch_varlen":
            A.register_varlen()
        m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl)
        m.config.use_cache = False
        _MODELS[impl] = m.eval()
    _MODELS[impl].config.sliding_window = window
    return _MODELS[impl]


def _examples(lengths=LENGTHS, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = [1] + torch.randint(3, 32000, (n - 1,), generator=gen).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 10 + ids[10:]})
    return out


def _token_losses(logits, labels):
    """Per-token cross entropy of predicting labels[t+1] from position t (-100: 0)."""
    shift = labels[..., 1:]
    loss = torch.nn.functional.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), shift.flatten(),
                                             ignore_index=IGNORE_INDEX, reduction="none")
    return loss.view(shift.shape)


@torch.no_grad()
def _per_sequence(model, examples):
    """Reference: each sequence alone, its own forward pass."""
    logits, losses = [], []
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        out = model(input_ids=ids).logits
        logits.append(out[0])
        losses.append(_token_losses(out, labels)[0])
    return logits, losses


@torch.no_grad()
def _packed(model, examples, **overrides):
    """One packed row; cu_seq_lens only for the backend that reads them (as train.py does)."""
    varlen = model.config._attn_implementation == "torch_varlen"
    batch = PackedCollator(with_cu_seqlens=varlen)([examples])
    batch.update(overrides)
    labels = batch.pop("labels")
    out = model(**batch).logits
    # Split the row back into sequences; the label of each sequence's first token is -100, so
    # per-token losses line up with the per-sequence ones position for position.
    logits, losses, start = [], [], 0
    token_losses = _token_losses(out, labels)[0]
    for ex in examples:
        n = len(ex["input_ids"])
        logits.append(out[0, start:start + n])
        losses.append(token_losses[start:start + n - 1])
        start += n
    return logits, losses


_REFERENCE = {}


def _reference(path):
    """Per-sequence eager logits and losses of the default examples (computed once)."""
    if "ref" not in _REFERENCE:
        _REFERENCE["ref"] = _per_sequence(_model(path, "eager"), _examples())
    return _REFERENCE["ref"]


def _max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# Exactness: packed == per sequence, for eager, SDPA and varlen (reference kernel)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "torch_varlen"])
def test_packed_logits_and_losses_equal_per_sequence(tiny_path, impl, reference_kernel):
    examples = _examples()
    ref_logits, ref_losses = _reference(tiny_path)
    logits, losses = _packed(_model(tiny_path, impl), examples)
    assert _max_diff(logits, ref_logits) < TOL
    assert _max_diff(losses, ref_losses) < TOL
    if impl == "torch_varlen":  # the kernel got the collator's boundaries and the (W-1, 0) window
        call = reference_kernel[-1]
        assert call["cu_q"].tolist() == [0, 150, 240, 273, 473] and call["max_q"] == 200
        assert call["window_size"] == (WINDOW - 1, 0) and call.get("enable_gqa") is True


@pytest.mark.parametrize("impl", ["eager", "sdpa", "torch_varlen"])
def test_control_broken_isolation_is_detected(tiny_path, impl, reference_kernel):
    """Position ids continuous across the row (and, for varlen, one sequence in cu_seq_lens):
    sequences see each other and the comparison fails."""
    examples = _examples()
    ref_logits, _ = _reference(tiny_path)
    total = sum(LENGTHS)
    overrides = {"position_ids": torch.arange(total)[None]}
    if impl == "torch_varlen":
        overrides.update(cu_seq_lens_q=torch.tensor([0, total], dtype=torch.int32), max_length_q=total,
                         cu_seq_lens_k=torch.tensor([0, total], dtype=torch.int32), max_length_k=total)
    logits, _ = _packed(_model(tiny_path, impl), examples, **overrides)
    assert _max_diff(logits[1:], ref_logits[1:]) > 1e-2  # every later sequence is contaminated
    assert _max_diff(logits[:1], ref_logits[:1]) < TOL  # the first one only sees itself (causal)


@pytest.mark.parametrize("impl", ["eager", "sdpa", "torch_varlen"])
@pytest.mark.parametrize("window", [None, WINDOW - 1, WINDOW + 1])
def test_control_wrong_window_is_detected(tiny_path, impl, window, reference_kernel):
    """Packed with no window, or one token off either way: no longer equal to the windowed reference."""
    examples = _examples()
    ref_logits, _ = _reference(tiny_path)
    logits, _ = _packed(_model(tiny_path, impl, window=window), examples)
    assert _max_diff(logits, ref_logits) > 1e-3
    short = LENGTHS.index(33)  # shorter than every window here: unaffected
    assert (logits[short] - ref_logits[short]).abs().max().item() < TOL


def test_window_semantics_match_transformers_mask():
    """transformers: query i sees keys j with i - W < j <= i (W keys). flash-style (W-1, 0) is the same;
    (W, 0) is one key too many."""
    torch.manual_seed(0)
    lens, w, hq, hk, d = [37, 9, 50], 8, 4, 2, 16
    cu = torch.tensor([0, 37, 46, 96], dtype=torch.int32)
    q, k, v = torch.randn(96, hq, d), torch.randn(96, hk, d), torch.randn(96, hk, d)
    expected = []
    for s, n in enumerate(lens):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        allowed = (j <= i) & (j > i - w)  # transformers' sliding_window_overlay + causal
        kk, vv = k[sl].repeat_interleave(hq // hk, 1), v[sl].repeat_interleave(hq // hk, 1)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[sl].transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=allowed)
        expected.append(out.transpose(0, 1))
    expected = torch.cat(expected)
    assert A.flash_window(w, 50) == (w - 1, 0)
    got = A.reference_varlen_attn(q, k, v, cu, cu, 50, 50, window_size=A.flash_window(w, 50), enable_gqa=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    off_by_one = A.reference_varlen_attn(q, k, v, cu, cu, 50, 50, window_size=(w, 0), enable_gqa=True)
    assert (off_by_one - expected).abs().max() > 1e-2
    assert A.flash_window(None, 50) == (-1, 0) and A.flash_window(4096, 4096) == (-1, 0)


# ---------------------------------------------------------------------------------------------
# varlen: the three ways to GQA, and the batches that come without cu_seq_lens


def test_varlen_repeats_kv_heads_where_the_kernel_refuses_fewer(tiny_path, reference_kernel, monkeypatch):
    monkeypatch.setattr(A, "_GQA", "repeat")
    examples = _examples()
    ref_logits, _ = _reference(tiny_path)
    logits, _ = _packed(_model(tiny_path, "torch_varlen"), examples)
    assert _max_diff(logits, ref_logits) < TOL
    assert reference_kernel[-1]["heads"] == (8, 8) and "enable_gqa" not in reference_kernel[-1]


@pytest.mark.parametrize("refuses", [False, True], ids=["takes-gqa-without-a-flag", "refuses-without-a-flag"])
def test_varlen_probes_whether_a_kernel_without_the_flag_takes_fewer_kv_heads(tiny_path, monkeypatch, refuses):
    """torch 2.11's varlen_attn has no enable_gqa and hands K/V with fewer heads straight to the
    flash kernel; one that refused them would get them repeated, from its first refusal on."""
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=None, window_size=(-1, -1)):
        calls.append((q.shape[1], k.shape[1]))
        if refuses and q.shape[1] != k.shape[1]:
            raise RuntimeError("number of heads in key/value must equal the query's")
        return A.reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                                       enable_gqa=True)

    monkeypatch.setattr(A, "_VARLEN_KERNEL", kernel)
    monkeypatch.setattr(A, "_GQA", None)
    A._kernel()
    assert A._GQA == "probe"
    examples = _examples()
    ref_logits, _ = _reference(tiny_path)
    logits, _ = _packed(_model(tiny_path, "torch_varlen"), examples)
    assert _max_diff(logits, ref_logits) < TOL
    layers = _model(tiny_path, "torch_varlen").config.num_hidden_layers
    if refuses:
        assert A._GQA == "repeat" and calls == [(8, 2), (8, 8)] + [(8, 8)] * (layers - 1)
    else:
        assert A._GQA == "direct" and calls == [(8, 2)] * layers


def test_varlen_without_cu_seq_lens_reads_boundaries_from_position_ids(tiny_path, reference_kernel):
    examples = _examples()
    ref_logits, _ = _reference(tiny_path)
    batch = PackedCollator(with_cu_seqlens=False)([examples])
    with torch.no_grad():
        out = _model(tiny_path, "torch_varlen")(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert _max_diff(list(out[0].split(LENGTHS)), ref_logits) < TOL
    assert reference_kernel[-1]["cu_q"].tolist() == [0, 150, 240, 273, 473]


@pytest.mark.parametrize("side", ["right", "left"])
def test_varlen_padded_batch_equals_eager(tiny_path, reference_kernel, side):
    """data.packing=false: padded batches with an attention mask still come out right."""
    examples = _examples([120, 70, 30])
    batch = PaddedCollator(pad_token_id=0)(examples)
    if side == "left":  # as batched generation pads
        n_pad = batch["attention_mask"].eq(0).sum(1).tolist()
        for key in ("input_ids", "attention_mask"):
            batch[key] = torch.stack([row.roll(n) for row, n in zip(batch[key], n_pad)])
        assert batch["attention_mask"][:, -1].all() and not batch["attention_mask"][:, 0].all()
    with torch.no_grad():
        ref = _model(tiny_path, "eager")(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        out = _model(tiny_path, "torch_varlen")(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    assert (out - ref)[real].abs().max().item() < TOL


def test_varlen_generation_with_cache_equals_eager(tiny_path, reference_kernel):
    """generate(): prefill through the kernel, cached decoding steps through the masked fallback,
    past the 64-token window."""
    prompt = torch.tensor([_examples([40])[0]["input_ids"]])
    outs = {}
    for impl in ("eager", "torch_varlen"):
        model = _model(tiny_path, impl)
        with torch.no_grad():
            gen = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40,
                                 do_sample=False, use_cache=True, output_scores=True, return_dict_in_generate=True,
                                 pad_token_id=0)
        outs[impl] = gen
    assert outs["eager"].sequences.tolist() == outs["torch_varlen"].sequences.tolist()
    diff = max((a - b).abs().max().item() for a, b in zip(outs["eager"].scores, outs["torch_varlen"].scores))
    assert diff < TOL


def test_cu_seq_lens_travel_through_peft_and_the_trainer_batch(tiny_path, reference_kernel, monkeypatch):
    """A LoRA model fed a collated batch: the kernel gets the collator's cu_seq_lens, and nothing
    reads sequence boundaries back from the device."""
    from mistral_qlora.config import LoraSection
    from mistral_qlora.model.lora import add_lora

    def no_device_read(*args, **kwargs):
        raise AssertionError("boundaries were recomputed from position_ids")

    monkeypatch.setattr(A, "_cu_seq_lens_from_position_ids", no_device_read)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32, attn_implementation="torch_varlen")
    base.config.use_cache = False
    model = add_lora(base, LoraSection(r=4, dropout=0.0), layer_plan(recompute=base.config.num_hidden_layers))
    model.train()
    examples = _examples([100, 80])
    batch = PackedCollator(with_cu_seqlens=True)([examples])
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)
    n_layers = base.config.num_hidden_layers
    assert len(reference_kernel) == 2 * n_layers  # forward, then recomputed under checkpointing
    assert all(c["cu_q"].tolist() == [0, 100, 180] and c["max_q"] == 100 for c in reference_kernel)


# ---------------------------------------------------------------------------------------------
# The 4-bit path (bitsandbytes NF4 on the CPU, LoRA on top)


def test_packed_equals_per_sequence_through_4bit_lora(tiny_path):
    """Through the real 4-bit path, kept in the layout training uses (keep_4bit_layout: bitsandbytes'
    CPU inference layout would compute in bfloat16), packed equals per-sequence at 1e-4."""
    from mistral_qlora.config import LoraSection
    from mistral_qlora.model.lora import add_lora

    base = load_tiny_base()
    assert base.config.sliding_window == WINDOW
    model = add_lora(base, LoraSection(r=4, dropout=0.0), layer_plan()).eval()
    examples = _examples([130, 70, 100])
    ref_logits, ref_losses = _per_sequence(model, examples)
    logits, losses = _packed(model, examples)
    assert _max_diff(logits, ref_logits) < 1e-4
    assert _max_diff(losses, ref_losses) < 1e-4
    leaky, _ = _packed(model, examples, position_ids=torch.arange(300)[None])
    assert _max_diff(leaky[1:], ref_logits[1:]) > 0.5
    base.config.sliding_window = None
    unwindowed, _ = _packed(model, examples)
    assert _max_diff(unwindowed, ref_logits) > 0.5


# ---------------------------------------------------------------------------------------------
# Selection


def test_auto_on_cpu_is_sdpa_and_gpu_backends_say_why_not():
    from mistral_qlora.errors import UserError

    if torch.cuda.is_available():
        pytest.skip("CPU-only expectations")
    assert B.select_attention("auto", torch.float32) == "sdpa"
    assert B.select_attention("eager") == "eager"
    for name in ("varlen", "flex", "flash_attention_2"):
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            B.select_attention(name)


@pytest.mark.parametrize("flash_attn, dtype, expected", [
    (True, torch.bfloat16, "flash_attention_2"),
    (False, torch.bfloat16, "varlen"),
    (True, torch.float32, "flex"),  # flash-style kernels run in half precision only
])
def test_auto_order_on_a_gpu(monkeypatch, flash_attn, dtype, expected):
    monkeypatch.setattr(B, "_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(B, "_flash_attn_problem", lambda: None if flash_attn else "needs the flash-attn package")
    assert B.select_attention("auto", dtype) == expected


def test_varlen_is_registered_with_transformers():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    assert A.implementation("varlen") == "torch_varlen"
    assert AttentionInterface._global_mapping["torch_varlen"] is A.varlen_attention_forward
    assert "torch_varlen" in ALL_MASK_ATTENTION_FUNCTIONS
    assert A.TAKES_CU_SEQLENS == {"flash_attention_2", "varlen"}


def test_packed_rows_carry_int32_positions_that_give_the_same_logits():
    """The collator hands positions and cu_seqlens over as int32, and the model reads int32
    positions as it reads int64 ones."""
    from transformers import AutoModelForCausalLM

    from mistral_qlora.data.collator import PackedCollator
    from mistral_qlora.model.base import resolve_model_path

    gen = torch.Generator().manual_seed(0)
    rows = [[{"input_ids": torch.randint(3, 32000, (n,), generator=gen).tolist(), "labels": [1] * n}
             for n in (20, 9, 15)]]
    batch = PackedCollator(with_cu_seqlens=True)(rows)
    assert batch["position_ids"].dtype == batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["position_ids"][0].tolist() == [*range(20), *range(9), *range(15)]
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-random-mistral"), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    with torch.no_grad():
        wide = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"].long()).logits
        narrow = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        running = model(input_ids=batch["input_ids"]).logits  # positions 0..43: one sequence
    assert torch.equal(wide, narrow)
    assert not torch.allclose(narrow[:, 20:], running[:, 20:])  # the positions were read
