"""mistral-qlora: 4-bit QLoRA fine-tuning of Mistral-7B-Instruct, from one GPU to many nodes."""

__version__ = "0.1.0"
