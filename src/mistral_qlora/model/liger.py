"""Liger's Triton kernels (`model.kernels: liger`, chosen by plan/backends.py): RoPE, RMSNorm,
SwiGLU, and the lm_head fused with the cross-entropy so that the [tokens x vocabulary] logits are
never materialised. Applied to the model instance through Liger's own API, before LoRA wraps the
linears."""

from __future__ import annotations


def apply_kernels(model, kernels: str) -> None:
    """Patch the (not yet LoRA-wrapped) model instance with the chosen kernels."""
    if kernels != "liger":
        return
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=True)
