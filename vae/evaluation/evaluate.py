"""Models scored under one protocol: load each (a registered aekl version or a diffusers folder) into the aekl model
training uses, feed it the protocol's images, and run the evaluation the end of training runs
(vae/objectives/aekl/evaluation.py `measure`); write `evaluation.json` (the protocol and each model's numbers) and
print one table.

The images are the split's first `count` in file order, at the stored resolution, as uint8. The real images'
Inception statistics for rFID are computed by the first model's pass and cached (vae/objectives/aekl/fid.py); every
later model, in this command or another on the same shards, reads them back.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from torch import nn
from tqdm import tqdm

import pipeline
from vae.evaluation.tracking import log_evaluation_run
from vae.models import build_model
from vae.models.aekl import with_pretrained
from vae.models.options import AeklOptions
from vae.objectives.aekl.evaluation import measure, protocol_for, reference_key, scorers
from vae.objectives.aekl.fid import reference_file
from vae.objectives.aekl.losses import BACKBONE_MIN_SIDE
from vae.objectives.aekl.protocol import EvaluationProtocol, LpipsNet, Posterior
from vae.registry.store import ModelStoreError, diffusers_source

OUT_FILE = "evaluation.json"
COLUMNS = (("PSNR (dB)", "psnr", "{:.3f}"), ("SSIM", "ssim", "{:.4f}"), ("LPIPS", "lpips", "{:.4f}"),
           ("rFID", "rfid", "{:.3f}"))


class EvaluateOptions(BaseModel):
    """What `vaepipe evaluate` measures, and where."""

    split: str = Field("test", description="The shard directory's split (the ingest's held-out split is 'test').")
    count: int | None = Field(None, gt=0, description="The split's first N images; None: all of them.")
    posterior: Posterior = Field("mode", description="mode: decode the posterior mean; sample: one seeded draw.")
    seed: int = Field(0, description="The posterior draws' seed (posterior sample).")
    crop_size: tuple[int, int] | None = Field(None, description="Centre crop (H, W) of the stored images, as a "
                                              "training run with data.crop_size validates; None: whole images.")
    lpips: LpipsNet = Field("alex", description="LPIPS network: alex (the evaluation default), vgg (the training "
                            "loss's) or none.")
    lpips_weights: str | None = Field(None, description="torchvision's backbone file; default: the torch hub cache.")
    inception_weights: str | None = Field(None, description="torch-fidelity's FID Inception file; default: the "
                                          "torch hub cache.")
    batch_size: int = Field(16, gt=0, description="Images per forward pass.")
    device: str = Field("cpu", description="torch device: cpu, cuda, cuda:1, mps.")
    cache_dir: Path | None = Field(None, description="Where rFID's real statistics are cached; default "
                                   "$VAEPIPE_CACHE, else ~/.cache/vaepipe (XDG_CACHE_HOME moves it).")

    def cache(self) -> Path:
        if self.cache_dir is not None:
            return Path(self.cache_dir)
        if os.environ.get("VAEPIPE_CACHE"):
            return Path(os.environ["VAEPIPE_CACHE"])
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaepipe"


@dataclass
class Evaluation:
    """What `evaluate_models` found: the protocol, and per model its reference, provenance, numbers and run."""

    protocol: EvaluationProtocol
    models: list[dict] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)  # metric -> why it is left out, for every model alike

    def to_json(self) -> dict:
        return {"protocol": self.protocol.model_dump(mode="json"), "protocol_sha256": self.protocol.digest(),
                "absent": self.absent, "models": self.models}


def _build(folder: Path, image_shape: tuple[int, int, int]) -> nn.Module:
    """A diffusers AutoencoderKL folder as the aekl model training builds (its architecture from config.json)."""
    options = with_pretrained(AeklOptions(arch="aekl", pretrained=str(folder)))
    return build_model("aekl", image_shape, options.latent_dim, **options.constructor_options()).eval()


def load_aekl(ref: str, image_shape: tuple[int, int, int], tracking_uri: str | None = None) -> tuple[nn.Module, dict]:
    """`models:/NAME@ALIAS` or `models:/NAME/VERSION` (its diffusers folder pulled from `tracking_uri`) or a
    diffusers folder, as an aekl model for images (C, H, W); with where it came from. Anything else is refused in
    one line (a registered model of another architecture, a folder that holds no AutoencoderKL)."""
    try:
        with diffusers_source(ref, tracking_uri, prefix="vaepipe-evaluate-") as (folder, provenance):
            return _build(folder, image_shape), provenance
    except ModelStoreError as err:  # a missing name, alias or version; another architecture's version
        raise ModelStoreError(f"model {ref} cannot be evaluated: {err}") from None
    except ValueError as err:  # vae.models' messages speak of model.pretrained: here it is the MODEL argument
        raise ValueError(f"model {ref!r} cannot be evaluated: {err}") from None


def _images(shard_dir: str | os.PathLike, options: EvaluateOptions, count: int, label: str) -> Iterator[torch.Tensor]:
    """The split's first `count` images in file order, centre-cropped to `options.crop_size` when given (the
    loader's crop, as validation's), uint8 (B, C, H, W) on the device, under a progress bar."""
    loader = pipeline.open_loader(shard_dir, options.split, options.batch_size, shuffle=False, drop_last=False,
                                  pad=False, device=options.device, crop_size=options.crop_size, crop="centre")
    left = count
    with tqdm(total=count, unit="img", desc=label, disable=None, leave=False) as bar:
        for batch in loader:
            images = batch.images[:left]
            left -= len(images)
            bar.update(len(images))
            yield images
            if left == 0:
                return


def evaluate_models(models: list[str], shard_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                    options: EvaluateOptions | None = None, tracking_uri: str | None = None,
                    track: bool = True) -> Evaluation:
    """Score each of `models` on `shard_dir` under one protocol; write `evaluation.json` into `out_dir` (when
    given) and, with `track`, one MLflow run per model at `tracking_uri`. Every model is loaded before any is
    scored, so a bad one costs no compute."""
    options = options or EvaluateOptions()
    if not models:
        raise ValueError("give at least one MODEL (models:/NAME@ALIAS, models:/NAME/VERSION or a diffusers folder)")
    index = pipeline.read_index(shard_dir)  # a missing or incomplete directory is refused here, in one line
    available = index.split(options.split).num_samples
    count = options.count or available
    if count > available:
        raise ValueError(f"--count {count} is more than the {available} images of split {options.split!r} in "
                         f"{shard_dir}: give at most {available}, or another --split ({', '.join(index.splits)})")
    h, w, c = index.image_shape
    if options.crop_size is not None:
        if not (0 < options.crop_size[0] <= h and 0 < options.crop_size[1] <= w):
            raise ValueError(f"--crop-size {options.crop_size[0]} {options.crop_size[1]} does not fit the {h}x{w} "
                             f"images of {shard_dir}: give a crop of at most {h} {w}")
        h, w = options.crop_size
    if options.lpips != "none" and min(h, w) < BACKBONE_MIN_SIDE[options.lpips]:
        raise ValueError(f"LPIPS({options.lpips}) takes images of at least {BACKBONE_MIN_SIDE[options.lpips]} px a "
                         f"side, these are {h}x{w}: pass --lpips none (or another network)")
    loaded = [load_aekl(ref, (c, h, w), tracking_uri) for ref in models]
    tools = scorers(options.lpips, options.lpips_weights, options.inception_weights, images=count)
    protocol = protocol_for(index, pipeline.index_sha256(shard_dir), options.split, count, options.crop_size,
                            options.posterior, options.seed, tools)
    reference = reference_file(options.cache(), reference_key(protocol)) if tools.fid is not None else None
    result = Evaluation(protocol, absent={k.removeprefix("val/"): why for k, why in tools.absent.items()})
    for ref, (model, provenance) in zip(models, loaded, strict=True):
        model.to(options.device)
        images = _images(shard_dir, options, count, ref)
        metrics, stats, cached = measure(model, images, options.device, tools, protocol, reference=reference)
        model.cpu()
        scores = {k.removeprefix("val/"): v for k, v in metrics.items()}
        entry = {"model": ref, "provenance": provenance, "metrics": scores, "latents": stats._asdict(),
                 "fid_reference": None if reference is None else {"file": str(reference), "cached": cached}}
        if track:
            entry["run_id"] = log_evaluation_run(ref, provenance, protocol, scores, shard_dir, tracking_uri)
        result.models.append(entry)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / OUT_FILE).write_text(json.dumps(result.to_json(), indent=2))
    return result


def format_table(result: Evaluation) -> str:
    """The protocol line, then one row per model: PSNR, SSIM, LPIPS, rFID ('absent' where not measured)."""
    names = [m["model"] for m in result.models]
    width = max(len("model"), *(len(n) for n in names))
    head = f"{'model':<{width}}" + "".join(f"  {title:>10}" for title, _, _ in COLUMNS)
    rows = [result.protocol.line(), head]
    for entry in result.models:
        cells = []
        for _, key, fmt in COLUMNS:
            value = entry["metrics"].get(key)
            cells.append("absent" if value is None else fmt.format(value) if math.isfinite(value) else str(value))
        rows.append(f"{entry['model']:<{width}}" + "".join(f"  {cell:>10}" for cell in cells))
    rows += [f"{metric}: absent, {why}" for metric, why in result.absent.items()]
    return "\n".join(rows)
