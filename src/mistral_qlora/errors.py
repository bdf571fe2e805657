"""Errors a user can cause, and the exit codes the command line answers with.

Anything raised as `UserError` ends the program with one line on stderr and exit code 2
(no traceback unless `--debug`). Everything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2
# The run saved a checkpoint after SIGTERM/SIGUSR1 and stopped early; a scheduler may requeue it.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL


class UserError(Exception):
    """A problem with the user's input (config, data, paths, resources), told in one line."""

    exit_code = EXIT_USER_ERROR


class Preempted(Exception):
    """Training stopped on SIGTERM/SIGUSR1 after saving a checkpoint; rerun the same command to resume."""

    exit_code = EXIT_PREEMPTED
