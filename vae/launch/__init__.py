"""Launching training: the `accelerate launch` command (command), the devices a launch may use (devices), and the
supervisor that orchestrators signal (supervisor; `python -m vae.launch`, exit 75 when preempted).

Owns processes and devices, not training: the ranks run vae/train.py. Imports config and the checkpoint layout
(to tell a preempted run by its new checkpoint); never imports the trainer, objectives, tracking or the registry.
No re-exports here: `vae.launch.command` stays light for the flow, which builds commands and never trains.
"""
