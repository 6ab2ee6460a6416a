"""The one exception type for mistakes the user can fix.

The CLI turns a :class:`UserError` into a single line on stderr and exit code 2, with no
traceback (unless ``--debug``). Anything else is a bug in ftdist and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: config, data, model, storage or command line.

    The message must fit on one line, name the offending field/file/URI and say how to fix it.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class RunFailed(Exception):
    """A run that started but could not finish (a worker died, hung, or storage stayed down).

    Not the user's input: exit code 1. The message is one line saying which ranks failed and how,
    and that rerunning the same command resumes from the latest checkpoint.
    """

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class MemoryLimitExceeded(RunFailed):
    """A worker needed more memory than ``scaling.memory_per_worker_gb`` under
    ``scaling.enforce_memory_limit``: the run stops in one line (exit code 1) instead of the kernel's
    OOM killer taking some process of the node. Completed checkpoints are kept; the message names the
    levers that lower a worker's memory."""


class StorageUnavailable(RunFailed):
    """Object storage stayed unreachable through every retry: an outage, not the user's mistake.

    Exit code 1 like any run that could not finish; the message says to rerun the same command,
    which resumes from the latest complete checkpoint. (Before a run has started, the launcher
    reports the same condition as a :class:`UserError` about the endpoint: then a wrong
    ``storage.endpoint_url`` is the likelier cause.)
    """


class LossDiverged(RunFailed):
    """The training loss became NaN or infinite: the run stops at once (exit code 1).

    A RunFailed, not a UserError: no input is malformed, the optimisation diverged (usually a
    learning rate too high for the model, fp16 overflow, or no gradient clipping). The weights
    after a non-finite loss are garbage, so no checkpoint is taken of them; completed checkpoints
    are kept. The message says what to try, since rerunning unchanged would diverge again.
    """
