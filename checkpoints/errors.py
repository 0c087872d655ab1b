"""The one error type of the checkpoints package."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or used; the message names the checkpoint, the problem and the fix."""
