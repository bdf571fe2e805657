"""`mistral-qlora bench`: tokens/s and memory of the tutorial's recipe and ours, measured in one
process on one checkpoint over the same sequences; `mistral-qlora bench-data`: the data step's.

- cli.py         the `bench` and `bench-data` subcommands: flags (defaults from options.py) and commands
- options.py     what a bench run is asked to do (`BenchOptions`: the flags' defaults)
- synthetic.py   lognormal lengths, token examples, prompt/response and English-like prose records
- recipes.py     recipe names and what each means: its run config, its model
- workload.py    the sequences every recipe trains on, and their batches per recipe
- timing.py      one optimizer step as the Trainer takes it, timed between device syncs
- profile.py     one step under torch.profiler: GPU time by kind of kernel
- gpu_clocks.py  the SM clock and power the timed passes ran at (nvidia-smi in the background)
- run.py         the bench itself: every recipe, then the report
- compare.py     `--compare`: one recipe as planned against itself with levers switched off
- levers.py      the fast path's levers `--compare` can switch off, as `LayerPlan` fields
- eval.py        `--eval N`: evaluation in packed rows against one record per forward
- strategies.py  `--strategies`: single vs ZeRO-2 vs ZeRO-3 through `train` itself
- report.py      the JSON report and the printed tables
- data_step.py   `bench-data`: the data step's tokens/s and peak memory, phase by phase in child processes

Ours is built by the functions `train` uses (plan.make_plan, model.build.build_model), from the
run config a `train` run of the recipe would have (recipes.recipe_config).
"""
