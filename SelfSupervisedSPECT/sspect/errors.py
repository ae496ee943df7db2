"""One exception type for every failure a user can cause.

The message is a single sentence that names the cause and what to do; the CLI and the
run-job door print it as it is, never with a traceback.
"""


class SSPECTError(Exception):
    """A failure caused by the input or the environment, explained in one sentence."""
