"""Prefect flows and deployment wiring: `ingest-dataset`, `train-vae`, `encode-latents`, and the `vaepipe` command.

Flows call `pipeline` and `vae` functions and hold no ML logic of their own.
"""
