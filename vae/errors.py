"""The error of a run that cannot start, continue or finish: the message names the problem and the fix.

Its own module, because training (vae/trainer.py), the post-training path (vae/finalize.py) and the model spec
(vae/spec.py) all raise it and none of them may import the others' stack.
"""


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to do."""
