"""Liger's Triton kernels (`model.kernels: liger`, chosen by plan/backends.py): RoPE, RMSNorm,
SwiGLU, and the lm_head fused with the cross-entropy so that the [tokens x vocabulary] logits are
never materialised (SFT only: a preference method scores each record from its own logits, so the
plan turns the fused cross-entropy off, plan.memory.fused_loss_for). Applied to the model instance
through Liger's own API, before LoRA wraps the linears."""

from __future__ import annotations


def apply_kernels(model, kernels: str, fused_loss: bool = True) -> None:
    """Patch the (not yet LoRA-wrapped) model instance with the chosen kernels; `fused_loss`: with
    Liger's lm_head fused with the cross-entropy."""
    if kernels != "liger":
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=fused_loss)
