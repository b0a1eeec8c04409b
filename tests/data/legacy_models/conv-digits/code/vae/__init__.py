"""Model side of vaepipe: configs, models, objectives, training, evaluation and MLflow packaging.

Kept import-light on purpose: the MLflow model loads `vae.models` without pulling in training code.
"""
