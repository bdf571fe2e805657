"""The run around the Trainer: its arguments and callbacks, checkpoints that survive kills, and
the artifacts a finished run leaves.

- trainer.py: the transformers `Trainer` of a run: its arguments, callbacks in order, `RunTrainer`
- callbacks.py: the Trainer callbacks a run installs
- checkpoints.py: checkpoints staged, fsynced, renamed into place, verified before resume
- artifacts.py: what a run leaves in output_dir, and the checks before anything is written there
- console.py: what rank 0 prints while it trains
- trackers.py: experiment trackers (`train.report_to`)
"""
