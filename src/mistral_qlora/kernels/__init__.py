"""The fused LoRA layer for 4-bit linears and its kernels.

- fused_lora.py: `FusedLoraLinear4bit`, the layer that replaces PEFT's (registered through PEFT's
  custom-module hook), and how the plan configures it
- lora_autograd.py: its autograd functions (bf16 and FP8 base matmuls) and their math:
  dequantization, the adapter's products and dropout, the shared input gradient
- lora_product.py: the Triton kernel for the rank-r products, with its PyTorch reference
- fp8.py: e4m3 row quantization, NF4 -> e4m3, and the FP8 matmuls of the base weight
"""
