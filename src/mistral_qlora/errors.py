"""Errors a user can cause, and the exit codes the command line answers with.

Anything raised as `UserError` ends the program with one line on stderr and exit code 2
(no traceback unless `--debug`). Everything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2
# The run saved a checkpoint after SIGTERM/SIGUSR1 and stopped early; a scheduler may requeue it.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL
# No training step finished within train.hang_timeout on some rank: its stacks are in run.log, nothing
# new was saved, the last committed checkpoint is intact; a scheduler may requeue it (run/watchdog.py).
EXIT_HUNG = 76


class UserError(Exception):
    """A problem with the user's input (config, data, paths, resources), told in one line."""

    exit_code = EXIT_USER_ERROR


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; rerun the same command to resume."""

    exit_code = EXIT_PREEMPTED
