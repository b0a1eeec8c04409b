"""Writes the MLflow models in this folder with the code of the commit it runs on, so a test can prove that models
registered by that code still load after the package moved (issue 23).

Run from the repository root, once, at the commit before the move (a8888c8):

    .venv/bin/python tests/data/legacy_models/make.py

Each model gets small seeded random weights (no training: what is checked is loading, not quality), and beside it
`expected.npz`: a fixed input and the model's `reconstruct` output on it, computed by that same code, so the test
compares numbers and not only that something loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from vae.models import build_model
from vae.registry import model_spec, save_model

HERE = Path(__file__).resolve().parent
MODELS = {
    # name: (arch, image_shape, latent_dim, options)
    "conv-digits": ("conv", (1, 8, 8), 4, {"channels": [8, 16], "likelihood": "bernoulli"}),
    "aekl-tiny": ("aekl", (3, 16, 16), 2, {"channels": [8, 8, 8], "layers_per_block": 1, "norm_groups": 4,
                                         "attention": False, "likelihood": "gaussian"}),
}


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    for name, (arch, shape, latent_dim, options) in MODELS.items():
        torch.manual_seed(0)
        model = build_model(arch, shape, latent_dim, **options).eval()
        spec = model_spec(arch, shape, latent_dim, **options)
        x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
        with torch.inference_mode():
            out = model.decode(model.encode(torch.from_numpy(x))[0]).numpy()
        dst = HERE / name
        if dst.exists():
            shutil.rmtree(dst)
        save_model(model, spec, dst, input_example=x)
        np.savez(dst / "expected.npz", x=x, reconstruct=out)
        (dst / "made_by.json").write_text(json.dumps({"commit": commit, "script": "tests/data/legacy_models/make.py"}))
        print(f"{name}: {dst} ({sum(f.stat().st_size for f in dst.rglob('*') if f.is_file()) / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
