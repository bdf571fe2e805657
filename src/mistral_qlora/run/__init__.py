"""The run around the Trainer: its arguments and callbacks, checkpoints that survive kills, and
the artifacts a finished run leaves."""
