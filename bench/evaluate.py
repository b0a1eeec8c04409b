"""`vaepipe evaluate` with rFID: a model scored with the real images' Inception statistics cached (warm) against the
same evaluation computing them (cold), in one run.

Data: crops of scikit-learn's two sample photographs, ingested as shards. Model: a randomly initialised aekl exported
as a diffusers folder. Inception: torch-fidelity's architecture with random weights (tests/support/inception.py) in a
temporary torch hub cache (the real file is not on the dev box; its cost is the architecture's, not the weights').
LPIPS off, so the two arms
differ by the reals' Inception pass and nothing else. The arms alternate, `--repeats` times each; prints JSON with
the median and the fastest wall seconds per arm, the process's CPU seconds, and the ratios cold / warm (on a shared
box the fastest wall time and the CPU time are the least disturbed).

    .venv/bin/python bench/evaluate.py [--images 96] [--side 64] [--batch 16] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.inception import random_inception_file  # noqa: E402 - the stand-in Inception the tests use


def setup(root: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """Shards of photo crops, a random aekl diffusers folder, random Inception weights in a torch hub cache here."""
    from sklearn.datasets import load_sample_images

    import pipeline
    from vae.models.spec import build_from_spec, model_spec
    from vae.objectives.aekl.fid import INCEPTION_FILE
    from vae.registry.diffusers import export_diffusers

    s = args.side
    crops = [image[r:r + s, c:c + s] for image in load_sample_images().images
             for r in range(0, 427 - s, s // 2) for c in range(0, 640 - s, s // 2)][:args.images]
    if len(crops) < args.images:
        raise SystemExit(f"the photos give {len(crops)} crops of {s} px; ask for fewer --images")
    np.save(root / "test.npy", np.stack(crops))
    pipeline.ingest("arrays", {"files": {"test": str(root / "test.npy")}}, root / "shards", 64, 16, progress=False)
    torch.manual_seed(0)
    spec = model_spec("aekl", (3, s, s), 4, channels=[32, 64, 64], layers_per_block=1, norm_groups=8,
                      attention=False, likelihood="gaussian")
    folder = export_diffusers(build_from_spec(spec).eval(), root / "vae",
                              {"shift_factor": 0.0, "scaling_factor": 1.0, "mean": [0.0] * 4, "std": [1.0] * 4})
    os.environ["TORCH_HOME"] = str(root / "torch")
    random_inception_file(root / "torch" / "hub" / "checkpoints" / INCEPTION_FILE)
    return root / "shards", str(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--side", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from vae.evaluation import EvaluateOptions, evaluate_models

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, folder = setup(root, args)
        options = EvaluateOptions(batch_size=args.batch, lpips="none", cache_dir=root / "warm")
        evaluate_models([folder], shards, options=options, track=False)  # fills the warm cache (and warms up)
        seconds: dict[str, list[float]] = {"cold": [], "warm": []}
        cpu: dict[str, list[float]] = {"cold": [], "warm": []}  # this process's CPU seconds: less swayed by others
        fids: dict[str, float] = {}
        for i in range(args.repeats):
            for arm in ("cold", "warm"):
                cache = root / f"cold-{i}" if arm == "cold" else root / "warm"
                start, start_cpu = time.perf_counter(), time.process_time()
                result = evaluate_models([folder], shards, options=options.model_copy(update={"cache_dir": cache}),
                                         track=False)
                seconds[arm].append(time.perf_counter() - start)
                cpu[arm].append(time.process_time() - start_cpu)
                entry = result.models[0]
                assert entry["fid_reference"]["cached"] == (arm == "warm")
                fids[arm] = entry["metrics"]["rfid"]
    cold, warm = statistics.median(seconds["cold"]), statistics.median(seconds["warm"])
    fastest = min(seconds["cold"]) / min(seconds["warm"])
    print(json.dumps({"images": args.images, "side": args.side, "threads": args.threads,
                      "cold_s": round(cold, 2), "warm_s": round(warm, 2), "ratio_cold_over_warm": round(cold / warm, 2),
                      "ratio_fastest": round(fastest, 2),
                      "ratio_cpu": round(statistics.median(cpu["cold"]) / statistics.median(cpu["warm"]), 2),
                      "cpu_s": {k: [round(v, 2) for v in vs] for k, vs in cpu.items()},
                      "rfid_cold": fids["cold"], "rfid_warm": fids["warm"],
                      "runs_s": {k: [round(v, 2) for v in vs] for k, vs in seconds.items()}}))


if __name__ == "__main__":
    main()
