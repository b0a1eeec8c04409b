"""The registry: trained models as MLflow models, their versions and aliases, and what users pull from it.

- `packaging`: a model logged or saved as a pyfunc "model from code" (spec JSON, safetensors, a copy of
  `vae.models`), and loaded back as a torch module;
- `pyfunc`: the model file MLflow runs at load time (reconstruct, encode, decode, sample), with its limits;
- `diffusers`: an aekl model as a diffusers folder with its latent statistics;
- `versions`: registering a version, the `champion` and `challenger` aliases under concurrent registrars;
- `publish`: a finished run's output directory logged and registered (the journal's publisher);
- `store`: listing models and pulling a version (`vaepipe models`).

Owns everything a registered model is. Imports config, models, objectives (the champion criterion), tracking
(the store's URI, provenance) and the run directory training leaves (checkpoints, evaluation.json); training
and tracking never import it: the entry points hand `publish.publish_run` to the journal.
"""
