"""Model side: tokenizer, the embedded tiny model, the 4-bit base with LoRA, attention backends."""
