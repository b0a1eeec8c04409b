"""Tracking: MLflow runs, their metrics and where a run came from.

- `store`: the embedded sqlite default, attaching to a store, creating a run with its params and provenance;
- `metrics`: the fixed metric names;
- `journal`: the on-disk metric journal rank 0 logs through, sent when MLflow answers (`python -m vae.tracking`
  sends what is left);
- `provenance`: datasets (lineage), source tags and commit, system metrics, the model version's description.

Owns everything said to MLflow about a run. Imports config and `pipeline`'s public API; never imports training,
objectives, the registry or launch code: registering a model is handed in as a `Publisher` (vae/tracking/journal.py).
"""
