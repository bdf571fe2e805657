"""The model: the base checkpoint in 4-bit (or ZeRO-3 partitions), its attention backend and
kernels, the LoRA adapters applied as the plan says, and the adapter on disk.

- build.py: the model a run trains, built from its plan (what `train` and `bench` call)
- base.py: the base checkpoint, its config, and its weights in 4-bit NF4
- builtin.py: the built-in checkpoints, made from a fixed seed, never downloaded
- zero3.py: the 4-bit base loaded straight into DeepSpeed ZeRO-3 partitions
- tokenizer.py: the checkpoint's tokenizer, or a Mistral SentencePiece model shipped offline
- attention.py: `model.attention` -> transformers' attention implementation, and `varlen`
- liger.py: Liger's Triton kernels applied to the model instance
- lora.py: LoRA on the base as the plan's `LayerPlan` says (the fused layer: kernels/)
- adapter.py: the adapter on disk: saved, checked, published, attached to a base
- greedy.py: greedy answers from a model in memory
"""
