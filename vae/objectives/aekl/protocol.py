"""The evaluation protocol: how an aekl model's PSNR, SSIM, LPIPS and rFID were measured, stored with every number.

rFID, PSNR and LPIPS move with the split, the image count, the resolution, the resize and crop rule, posterior mode
or sample, the LPIPS network and the FID implementation; numbers measured under two protocols do not compare. The
end of training (vae/objectives/aekl/objective.py) and `vaepipe evaluate` (vae/evaluation) both build an
`EvaluationProtocol` and write it beside their numbers (evaluation.json, the MLflow run's params, the registered
version's tags); `digest()` names it in one string, and the registry compares a challenger with the champion only
when the two digests are equal (vae/registry/versions.py), naming the `differences` otherwise.

Torch-free (pydantic and hashlib only), so the command line can show a protocol without loading a model.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, Field

Posterior = Literal["mode", "sample"]
LpipsNet = Literal["alex", "vgg", "none"]

PSNR_DEFINITION = ("per image on uint8: the image and its reconstruction both rounded to 0..255, "
                   "10 log10(255^2 / MSE), then averaged over images")
# torchmetrics' structural_similarity_index_measure defaults, stated so a change of defaults changes the digest
SSIM_SETTINGS = {"implementation": "torchmetrics structural_similarity_index_measure",
                 "inputs": "the uint8-rounded images / 255", "data_range": 1.0, "gaussian_kernel": True,
                 "kernel_size": 11, "sigma": 1.5, "k1": 0.01, "k2": 0.03, "reduction": "per image, then averaged"}
# version tags of a registered aekl version (vae/training/finalize.py writes them, vae/registry/versions.py reads)
DIGEST_TAG = "eval_protocol_sha256"
PROTOCOL_TAG = "eval_protocol"


class EvaluationProtocol(BaseModel, frozen=True):
    """Everything that decides what an aekl evaluation's numbers mean."""

    version: int = Field(1, description="This schema's version.")
    split: str = Field(description="The shard directory's split evaluated.")
    count: int = Field(gt=0, description="Images evaluated: the split's first `count` in file order.")
    resolution: tuple[int, int] = Field(description="(H, W) of the images the model sees.")
    channels: int = Field(description="Image channels (grey images are repeated to RGB for LPIPS and FID).")
    ingest_transform: str = Field(description="What the ingest did to the pixels, from the shard index.")
    crop: str = Field(description="What the evaluation did to the stored images before the model.")
    posterior: Posterior = Field(description="mode: decode the posterior mean; sample: one draw per image.")
    seed: int | None = Field(description="The draws' seed (posterior sample); None for the mode.")
    psnr: str = Field(PSNR_DEFINITION, description="How PSNR is computed.")
    ssim: dict = Field(default_factory=lambda: dict(SSIM_SETTINGS), description="SSIM's implementation and settings.")
    lpips: str = Field(description="The LPIPS network, implementation and weights, or 'absent: <why>'.")
    fid: str = Field(description="The FID implementation and feature extractor (with its weights' sha256), or "
                     "'absent: <why>'.")
    shard_index_sha256: str = Field(description="sha256 of the shard directory's index.json: the exact data.")

    def digest(self) -> str:
        """sha256 of the protocol's canonical JSON (sorted keys): equal digests, equal protocols."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    def canonical(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def params(self) -> dict[str, str]:
        """The fields as MLflow run params `protocol.<field>` (strings; the SSIM settings as JSON)."""
        return {f"protocol.{k}": v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                for k, v in self.model_dump(mode="json").items()}

    def line(self) -> str:
        """One line for the top of a table."""
        sample = f"sample (seed {self.seed})" if self.posterior == "sample" else "mode"
        return (f"protocol {self.digest()[:12]}: {self.split} split, {self.count} images at {self.resolution[0]}x"
                f"{self.resolution[1]} ({self.crop}), posterior {sample}, PSNR on uint8, LPIPS {self.lpips}, "
                f"FID {self.fid}, shards {self.shard_index_sha256[:12]}")


def differences(ours: dict, theirs: dict | None) -> list[str]:
    """The protocol fields that differ between two protocols' JSON dicts (None: recorded before protocols were)."""
    if theirs is None:
        return ["(no protocol recorded)"]
    return sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
