"""What an ingest does with collections as people have them (issue 12, items 8-10): one-split folders, mixed
image sizes, too many skipped inputs, and training configs that name a source without its options."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run
from PIL import Image

import pipeline
from pipeline import ShardFormatError, SourceError
from vae.config import load_config


def _tree(root: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """PNG files named by `sizes` (relative path -> (H, W)), RGB noise."""
    rng = np.random.default_rng(seed)
    for rel, (h, w) in sizes.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return root


# ---- item 8: a folder with only test/ (or only train/)


def test_one_split_folder_warns_at_ingest_and_training_names_both_fixes(tmp_path, caplog):
    root = _tree(tmp_path / "faces", {f"test/p{i // 4}/{i}.png": (8, 8) for i in range(12)})
    with caplog.at_level(logging.WARNING, logger="pipeline.ingestion"):
        index = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False)
    assert list(index.splits) == ["test"]
    assert "only the split 'test'" in caplog.text and "--ingest.test_fraction 0.1" in caplog.text

    from vae.training.data import build_loaders

    cfg = load_config(None, ["--source.name", "imagefolder", "--ingest.shard_dir", str(tmp_path / "shards")])
    fixes = r"--ingest.test_fraction 0.1 --ingest.overwrite true.*--data.train_split and --data.val_split"
    missing = r"has the split\(s\) \['test'\] but not data.train_split 'train'.*"
    with pytest.raises(ShardFormatError, match=missing + fixes):
        build_loaders(cfg, 0, 1, device="cpu")
    fixed = load_config(None, ["--source.name", "imagefolder", "--ingest.shard_dir", str(tmp_path / "shards"),
                               "--data.train_split", "test", "--train.batch_size", "4"])
    train, val = build_loaders(fixed, 0, 1, device="cpu")
    assert train.num_samples == val.num_samples == 12


# ---- item 9: mixed sizes and the skip threshold


def test_mixed_sizes_are_refused_before_writing_with_the_histogram(tmp_path):
    # the first file in sort order is the odd one: today it set the target and 6 of 7 images were skipped, exit 0
    root = _tree(tmp_path / "glyphs", {"a.png": (10, 12), **{f"b{i}.png": (7, 7) for i in range(4)},
                                       "c1.png": (5, 9), "c2.png": (5, 9)})
    with pytest.raises(SourceError, match=r"3 of 7 images are not 7x7 .*sizes: 7x7: 4, 5x9: 2, 10x12: 1.*"
                                          r"ingest.size_rule crop.*ingest.max_skip_fraction"):
        pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards").exists() or not any((tmp_path / "shards").glob("*.tar"))


def test_mixed_sizes_with_a_rule_take_the_most_common_size(tmp_path):
    root = _tree(tmp_path / "glyphs", {"a.png": (10, 12), **{f"b{i}.png": (7, 7) for i in range(4)}})
    index = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False, size_rule="crop")
    assert index.image_shape == (7, 7, 3) and index.splits["train"].num_samples == 5 and not index.skipped


def test_a_few_odd_sizes_under_the_threshold_are_skipped_and_reported(tmp_path):
    root = _tree(tmp_path / "photos", {"odd.png": (9, 9), **{f"p{i:03d}.png": (6, 6) for i in range(120)}})
    index = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False)
    assert index.image_shape == (6, 6, 3) and index.splits["train"].num_samples == 120
    assert index.skipped == {"size": 1}


def test_exif_rotated_photos_count_at_their_displayed_size(tmp_path):
    root = tmp_path / "phone"
    root.mkdir()
    for i in range(3):  # stored 6 high x 10 wide, shown rotated by 90 degrees: 10 x 6
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(np.zeros((6, 10, 3), np.uint8)).save(root / f"{i}.jpg", exif=exif)
    from pipeline.sources import build_source

    assert dict(build_source("imagefolder", {"root": str(root)}).shapes("train")) == {(10, 6, 3): 3}


def test_skipping_more_than_the_threshold_fails_naming_reasons_and_report(tmp_path):
    root = _tree(tmp_path / "messy", {f"g{i}.png": (6, 6) for i in range(8)})
    for i in range(2):
        (root / f"z{i}.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(SourceError, match=r"2 of 10 inputs \(20.0%\) were skipped \({'corrupt': 2}\), more than "
                                          r"ingest.max_skip_fraction \(0.01\).*skipped.jsonl"):
        pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False)
    assert not (tmp_path / "shards" / "index.json").exists()
    index = pipeline.ingest("imagefolder", {"root": str(root)}, tmp_path / "shards", progress=False,
                            max_skip_fraction=0.25)  # accepted: the groups written above are kept, not rewritten
    assert index.splits["train"].num_samples == 8 and index.skipped == {"corrupt": 2}


# ---- item 10: training needs the shard directory, not the source's options


def test_training_config_may_name_a_source_without_its_options(tmp_path):
    cfg = load_config(None, ["--source.name", "imagefolder", "--ingest.shard_dir", str(tmp_path)])
    assert cfg.source.options == {}
    with pytest.raises(ValueError, match=r"source.options.nonsense: Extra inputs are not permitted"):
        load_config(None, ["--source.name", "imagefolder", "--source.options", "{nonsense: 1}"])  # still checked
    with pytest.raises(SourceError, match=r"source.options.root: Field required"):  # the ingest needs it
        pipeline.ingest("imagefolder", {}, tmp_path / "out", progress=False)


def test_a_complete_directory_serves_a_config_that_omits_the_source_options(tmp_path):
    root = _tree(tmp_path / "pics", {f"{s}/{i}.png": (6, 6) for s in ("train", "test") for i in range(4)})
    out = tmp_path / "shards"
    pipeline.ingest("imagefolder", {"root": str(root)}, out, progress=False)
    assert pipeline.prepare_dir("imagefolder", {}, out, overwrite=False) is not None  # what the flow asks
    with pytest.raises(ShardFormatError, match="already holds shards of"):
        pipeline.prepare_dir("imagefolder", {"root": str(tmp_path / "elsewhere")}, out, overwrite=False)


@pytest.mark.slow
def test_accelerate_training_on_imagefolder_shards_without_the_root(tmp_path):
    """The preset names imagefolder and no root: training reads the shards and never needs the source."""
    from vae.launch.command import accelerate_command

    root = _tree(tmp_path / "pics", {f"{s}/{i}.png": (8, 8) for s in ("train", "test") for i in range(32)})
    out = tmp_path / "shards"
    pipeline.ingest("imagefolder", {"root": str(root)}, out, progress=False)
    preset = tmp_path / "preset.yaml"
    preset.write_text("source: {name: imagefolder}\nmodel: {arch: mlp}\nloss: {likelihood: gaussian}\n"
                      "train: {epochs: 1, batch_size: 8}\ntracking: {finalize: false}\n")
    argv, env = accelerate_command(preset, 1, overrides=["--ingest.shard_dir", str(out), "--train.output_dir",
                                                         str(tmp_path / "run")])
    result = run(argv, env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list((tmp_path / "run" / "checkpoints").glob("*/meta.json"))
