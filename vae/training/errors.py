"""The error of a run that cannot start, continue or finish: the message names the problem and the fix.

Its own module, because the trainer, the checkpoint layout, the post-training path and the entry script all raise
or catch it (vae/training/checkpoint.py's CheckpointError is one).
"""


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""
