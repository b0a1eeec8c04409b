"""`vaepipe evaluate`: registered aekl versions or diffusers folders scored on one shard directory under one
evaluation protocol, side by side.

- `evaluate`: the options, loading each model (a registered version's diffusers folder, or a folder) into the aekl
  model training uses, the images of the protocol, the evaluation itself (vae/objectives/aekl/evaluation.py
  `measure`, the code the end of training runs), `evaluation.json` and the table;
- `tracking`: one MLflow run per model (experiment `evaluate-vae`): the protocol's fields as params, its digest as a
  tag, the metrics, the model version and the source shards as inputs.

Owns comparing models under one protocol. Imports pipeline's public API, models, objectives, the registry (to pull
a registered version) and tracking; never imports training, launch, latents or flows; nothing imports it but the
flows.
"""

from vae.evaluation.evaluate import EvaluateOptions, Evaluation, evaluate_models, format_table, load_aekl

__all__ = ["EvaluateOptions", "Evaluation", "evaluate_models", "format_table", "load_aekl"]
