"""What one `mistral-qlora bench` run is asked to do."""

from __future__ import annotations

from dataclasses import dataclass

from mistral_qlora.bench.synthetic import DEFAULT_MAX_LEN, DEFAULT_MEDIAN, DEFAULT_MIN_LEN, DEFAULT_SIGMA


@dataclass
class BenchOptions:
    model: str = "tiny-random-mistral"
    model_dir: str | None = None  # where random:mistral-7b is written (default: the cache folder)
    data: str | None = None  # a dataset file instead of synthetic lengths
    sequences: int = 4000  # synthetic sequences to draw (only the first rows' worth are trained)
    median: int = DEFAULT_MEDIAN
    sigma: float = DEFAULT_SIGMA
    max_len: int = DEFAULT_MAX_LEN
    min_len: int = DEFAULT_MIN_LEN
    tokens_per_row: int = 8192
    padded_batch_size: int = 8
    warmup: int = 3  # warm-up rows (the padded recipe warms up on their sequences)
    timed_rows: int = 8  # timed rows (the padded recipe is timed on their sequences)
    repeats: int = 3  # timed passes over the timed rows per recipe; tokens/s is their median
    recipes: list[str] | None = None  # default: recipes.default_recipes
    sliding_window: str | int | None = "auto"
    gradient_checkpointing: bool = True
    lora_r: int = 16
    learning_rate: float = 1e-5
    dtype: str = "auto"
    seed: int = 0
    out: str | None = None
    profile: bool = False  # profile one timed step of the last recipe: where the time goes
