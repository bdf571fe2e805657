"""The commands around training: prepare (check the data), generate, merge, env."""
