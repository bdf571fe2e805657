"""The model: the base checkpoint in 4-bit (or ZeRO-3 partitions), its attention backend and
kernels, the LoRA adapters applied as the plan says, and the adapter on disk."""
