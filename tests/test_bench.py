"""The benchmark scripts' own logic: merging and redrawing large-batch results, and the GPU suite's smoke run."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _large_batch():
    spec = importlib.util.spec_from_file_location("large_batch", REPO / "bench/large_batch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(seed, *names):
    return {"arch": "mlp", "epochs": 3, "seed": seed,
            "runs": [{"name": n, "global_batch": 128 if n == "b128" else 8192, "curve": [-200.0 + seed, -150.0, -120.0]}
                     for n in names]}


def test_merged_runs_carry_their_seed_and_only_keeps_the_named_variants():
    merge = _large_batch().merge_runs
    reports = [_report(0, "b128", "b8192-a", "b8192-b"), _report(1, "b128", "b8192-a")]
    assert [r["name"] for r in merge(reports, ["b128", "b8192-a"])] == [
        "b128 seed 0", "b8192-a seed 0", "b128 seed 1", "b8192-a seed 1"]
    assert [r["name"] for r in merge(reports[:1])] == ["b128", "b8192-a", "b8192-b"]  # one report: names as they are
    assert merge(reports, ["b128"])[1]["curve"][0] == -199.0  # each run keeps its own curve


def test_replot_draws_several_reports_and_names_a_variant_that_none_has(tmp_path):
    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"seed{seed}.json")
        paths[-1].write_text(json.dumps(_report(seed, "b128", "b8192-a")))
    script = [sys.executable, str(REPO / "bench/large_batch.py"), "--replot", *map(str, paths)]
    drawn = subprocess.run([*script, "--only", "b8192-a", "--out", str(tmp_path / "plot.png")],
                           capture_output=True, text=True)
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run([*script, "--only", "b4096", "--out", str(tmp_path / "none.png")],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "none of ['b4096'] is in" in missing.stderr
    assert not (tmp_path / "none.png").exists()


@pytest.mark.timeout(1800)  # pyproject's 900 s is near what it took under load here
@pytest.mark.slow  # two short trainings through vae/train.py and one through bench/quality.py, each its own process
def test_gpu_suite_smoke_runs_every_part_on_a_cpu(tmp_path):
    """bench/gpu_suite.py --smoke: the matrix (bare, product, example), the ceiling, the profile and the quality
    run, at tiny sizes on random IDX data, so that the script the GPU session runs cannot rot."""
    out = tmp_path / "suite.json"
    result = subprocess.run([sys.executable, str(REPO / "bench/gpu_suite.py"), "run", "--smoke", "--out", str(out)],
                            capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["smoke"] and report["skipped"] == [] and report["errors"] == {}
    assert [(r["batch"], r["variant"]) for r in report["matrix"]] == [
        (32, "bf16-compiled-resident-cl"), (32, "bf16-graphs-streamed-cl")]
    for row in report["matrix"]:
        assert row["ours_img_s"] > 0 and row["bare_img_s"] > 0 and 0 < row["fraction_of_bf16_ceiling"]
        assert row["ran_as"] == "fp32-eager-" + row["variant"].split("-")[2]  # a CPU smoke run: eager, same data
    assert report["example_batch128_img_s"] > 0 and report["compute_ceiling_img_s"]["bf16"] > 0
    top = report["profile"]["top"]
    assert top and sum(r["share"] for r in top) <= 1.0 and all(r["calls"] > 0 for r in top)
    quality = report["quality"]
    assert quality["arch"] == "conv" and quality["k"] == 2 and quality["test_images"] == 16
    assert 0 < quality["test_nll_nats"] < 1000
    assert "| 32 | bf16-graphs-streamed-cl |" in result.stdout and "SMOKE" in result.stdout


def test_gpu_suite_table_names_failed_and_skipped_parts():
    """A part that failed on the device is named in the printed table, and a missing quality run is no crash."""
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "bench/gpu_suite.py")
    suite = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(suite)
    report = {"device": "H100", "torch": "2.x", "smoke": False, "example_batch128_img_s": 15000,
              "compute_ceiling_img_s": {"bf16": 2_500_000},
              "matrix": [{"batch": 16384, "variant": "bf16-compiled-resident-cl", "ours_img_s": 800_000,
                          "bare_img_s": 900_000, "ours_over_bare": 0.889, "ours_over_example": 53.3,
                          "fraction_of_bf16_ceiling": 0.32}],
              "skipped": ["batch 32768 bf16-compiled-resident-cl: over budget"],
              "errors": {"ours 16384 bf16-graphs-resident-cl": "RuntimeError: trace\nCUDA graphs: overwritten"}}
    text = suite.table(report)
    assert "| 16,384 | bf16-compiled-resident-cl | 800,000 | 900,000 | 0.889 | 53.3x | 0.32 |" in text
    assert "FAILED ours 16384 bf16-graphs-resident-cl: CUDA graphs: overwritten" in text
    assert "skipped: batch 32768" in text and "quality" not in text and "SMOKE" not in text
