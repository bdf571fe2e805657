"""The fused LoRA layer for 4-bit linears: its autograd function (fused_lora.py) and the Triton
kernel for its rank-r products with a PyTorch reference (lora_product.py)."""
