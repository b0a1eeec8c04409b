"""The `webdataset` source on shards written here in img2dataset's layout (tests/support/img2dataset.py) from real
photographs: ingest end to end, parallel groups from the stats files or a task per tar without them (the same
splits either way, resumable), a corrupt member, a truncated tar, patterns that name no shard, brace expansion
and splits, and shards in a moto S3 bucket."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import tomllib

import numpy as np
import pytest
import webdataset as wds
from conftest import REPO
from PIL import Image
from support.img2dataset import jpeg, photos, write_img2dataset

import pipeline
from pipeline import IngestSection, SourceError
from pipeline.ingestion import group as group_module
from pipeline.ingestion import plan as plan_module
from pipeline.ingestion.plan import PART_SHARDS
from pipeline.sources import available_sources, get_source_class
from pipeline.sources.webdataset import Shard, WebDatasetSource

N = 20  # photos; with a failed download every 5th input and 8 inputs per shard: 3 shards of 7, 6 and 7 images


@pytest.fixture(scope="module", autouse=True)
def registered(tmp_path_factory):
    """The source as pyproject.toml declares it, found through the entry-point group: an installed vaepipe whose
    metadata predates it (an editable install made before this file existed) gets a dist-info on sys.path that
    declares exactly pyproject's line, as a third-party package would."""
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["vaepipe.sources"]
    available_sources.cache_clear()
    if "webdataset" in available_sources():
        yield
        return
    dist = tmp_path_factory.mktemp("site") / "vaepipe_webdataset_preview-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vaepipe-webdataset-preview\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[vaepipe.sources]\nwebdataset = {declared['webdataset']}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(dist.parent))
        available_sources.cache_clear()
        yield
    available_sources.cache_clear()


@pytest.fixture(scope="module")
def images():
    return photos(N)


@pytest.fixture
def i2d(tmp_path, images):
    """img2dataset shards of the photos under tmp_path/i2d; returns (that directory, what the tars hold)."""
    out = tmp_path / "i2d"
    return out, write_img2dataset(out, images)


def _decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _stored_keys(shard_dir) -> list[str]:
    """Every key in our shards, read back with webdataset itself (a block sample lists its records' keys)."""
    index = pipeline.read_index(shard_dir)
    urls = [str(shard_dir / s.name) for s in index.splits["train"].shards]
    return [k for sample in wds.WebDataset(urls, shardshuffle=False) for k in json.loads(sample["keys.json"])]


def test_the_entry_point_names_the_source():
    assert get_source_class("webdataset") is WebDatasetSource


def test_img2dataset_shards_ingest_with_defaults_keeping_keys_and_jpeg_bytes(i2d, tmp_path):
    src, written = i2d
    assert len(written) == N and (src / "00000.parquet").is_file() == _has_pyarrow()
    index = pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", progress=False)
    assert index.source == {"name": "webdataset", "config": {"urls": str(src), "storage_options": {},
                                                             "image_keys": ["jpg", "jpeg", "png", "webp"],
                                                             "label_key": None, "caption_key": "txt",
                                                             "use_stats": True}}
    assert index.layout == "encoded-blocks" and index.image_shape == (128, 128, 3)
    assert index.splits["train"].num_samples == N and index.skipped == {} and index.splits["train"].captions
    images, labels = pipeline.read_split(tmp_path / "shards", "train")
    assert labels is None
    np.testing.assert_array_equal(images, np.stack([_decoded(w.jpg) for w in written]))
    assert _stored_keys(tmp_path / "shards") == [w.key for w in written]
    assert pipeline.read_captions(tmp_path / "shards", "train") == [(w.key, w.caption) for w in written]
    ours = sum(s.bytes for s in index.splits["train"].shards)
    theirs = sum(p.stat().st_size for p in src.glob("*.tar"))
    assert ours <= 1.05 * theirs  # the JPEG bytes kept, not re-encoded (img2dataset's tars also hold .txt, .json)


@pytest.mark.parametrize("layout", ["encoded", "encoded-blocks", "packed"])
def test_every_caption_and_key_is_read_back_by_pipeline_and_by_a_plain_webdataset(tmp_path, images, layout):
    """Captions with any text (accents, newlines, an empty one) travel with their keys through every layout, over
    parallel groups and a skipped member; `pipeline.read_captions` gives them in read_split's order, and webdataset
    itself sees them: a `txt` member per sample (encoded), a `texts.json` list beside `keys.json` (block layouts)."""
    src = tmp_path / "i2d"
    written = write_img2dataset(src, [im[::4, ::4] for im in images], replace={6: b"not a jpeg"},
                                captions={0: "", 1: "un café\nà deux lignes", 2: "  spaced  "})
    kept = [w for i, w in enumerate(written) if i != 6]
    index = pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", layout=layout, samples_per_shard=4,
                            block_size=2, max_skip_fraction=0.1, progress=False)
    assert index.splits["train"].captions and index.skipped == {"corrupt": 1}
    pairs = pipeline.read_captions(tmp_path / "shards", "train")
    assert pairs == [(w.key, w.caption) for w in kept] and pairs[1] == (written[1].key, "un café\nà deux lignes")
    images_back, _ = pipeline.read_split(tmp_path / "shards", "train")
    np.testing.assert_array_equal(images_back, np.stack([_decoded(w.jpg) for w in kept]))
    urls = [str(tmp_path / "shards" / s.name) for s in index.splits["train"].shards]
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        if layout == "encoded":
            seen.append((sample["key.txt"], sample["txt"]))
        else:
            seen += zip(sample["keys.json"], sample["texts.json"], strict=True)
    assert seen == pairs


def test_captions_off_or_absent_store_none_and_a_mix_is_refused(tmp_path, images):
    src = tmp_path / "i2d"
    written = write_img2dataset(src, [im[::4, ::4] for im in images[:6]])
    index = pipeline.ingest("webdataset", {"urls": str(src), "caption_key": None}, tmp_path / "off", progress=False)
    assert not index.splits["train"].captions
    assert pipeline.read_captions(tmp_path / "off", "train") == [(w.key, None) for w in written]
    with wds.TarWriter(str(tmp_path / "mixed.tar")) as sink:
        for i, w in enumerate(written):
            sink.write({"__key__": w.key, "jpg": w.jpg, **({"txt": w.caption} if i != 3 else {})})
    with pytest.raises(SourceError, match=f"record '{written[3].key}': some records have a caption and others do "
                                          "not.*caption_key"):
        pipeline.ingest("webdataset", {"urls": str(tmp_path / "mixed.tar")}, tmp_path / "mixed", progress=False)
    with wds.TarWriter(str(tmp_path / "latin1.tar")) as sink:
        sink.write({"__key__": "a", "jpg": written[0].jpg, "txt": "café".encode("latin-1")})
    (item,) = pipeline.build_source("webdataset", {"urls": str(tmp_path / "latin1.tar")}).records("train")
    assert item.kind == "caption" and "a.txt is not UTF-8 text" in item.reason


def test_stats_give_counts_so_groups_run_in_parallel_and_read_only_their_shards(i2d, tmp_path, monkeypatch):
    src, written = i2d
    options = {"urls": f"{src}/{{00000..00002}}.tar"}
    plan = pipeline.plan_ingest("webdataset", options, tmp_path / "shards", IngestSection(samples_per_shard=4))
    assert [(g.start, g.stop) for g in plan.groups] == [(a, min(a + 4, N)) for a in range(0, N, 4)]
    source = pipeline.build_source("webdataset", options)
    everything = [r.key for r in source.records("train")]
    assert source.num_records("train") == N and everything == [w.key for w in written]
    opened = []
    monkeypatch.setattr(Shard, "open", lambda self, real=Shard.open: opened.append(self.url) or real(self))
    for start, stop in [(0, 20), (3, 11), (7, 8), (13, 20), (19, None)]:
        opened.clear()
        assert [r.key for r in source.records("train", start, stop)] == everything[start:stop]
        first = 0 if start < 7 else 1 if start < 13 else 2
        assert opened[0].endswith(f"{first:05d}.tar")  # shards wholly before the range are not opened
    index = pipeline.ingest("webdataset", options, tmp_path / "shards", samples_per_shard=4, progress=False)
    assert _stored_keys(tmp_path / "shards") == everything and index.splits["train"].num_samples == N


def test_without_stats_each_input_tar_is_one_task_writing_its_own_shards(tmp_path, images, caplog):
    src = tmp_path / "i2d"
    written = write_img2dataset(src, images, stats=False)  # 3 tars of 7, 6 and 7 images
    tars = sorted(str(p) for p in src.glob("*.tar"))
    options = {"urls": str(src)}
    source = pipeline.build_source("webdataset", options)
    with caplog.at_level(logging.INFO, logger="pipeline.sources.webdataset"):
        assert source.num_records("train") is None
    assert "have no img2dataset _stats.json" in caplog.text and "one task per shard" in caplog.text
    assert source.parts("train") == tars
    assert [r.key for t in tars for r in source.part_records("train", t)] == [w.key for w in written]
    plan = pipeline.plan_ingest("webdataset", options, tmp_path / "shards", IngestSection(samples_per_shard=4))
    assert [(g.group, g.part, g.start, g.stop, g.first_shard) for g in plan.groups] == [
        (g, t, 0, None, g * PART_SHARDS) for g, t in enumerate(tars)]
    index = pipeline.ingest("webdataset", options, tmp_path / "shards", samples_per_shard=4, progress=False)
    assert pipeline.read_captions(tmp_path / "shards", "train") == [(w.key, w.caption) for w in written]
    assert [(s.name, s.num_samples) for s in index.splits["train"].shards] == [  # each tar's own shards, in order
        ("train-000000.tar", 4), ("train-000001.tar", 3), ("train-001000.tar", 4), ("train-001001.tar", 2),
        ("train-002000.tar", 4), ("train-002001.tar", 3)]
    images_back, _ = pipeline.read_split(tmp_path / "shards", "train")
    np.testing.assert_array_equal(images_back, np.stack([_decoded(w.jpg) for w in written]))
    with pytest.raises(SourceError, match="has no shard .*gone.tar"):
        list(source.part_records("train", str(src / "gone.tar")))


def _summary(index, shard_dir) -> dict:
    """What an ingest gives, whatever its groups: per split the count, skips and (key, caption) in order."""
    return {split: (info.num_samples, info.skipped, pipeline.read_captions(shard_dir, split))
            for split, info in index.splits.items()}


def test_one_task_or_one_per_tar_or_counted_groups_give_the_same_splits(tmp_path, images, monkeypatch):
    """Stats (counted groups of 4 images), no stats (a task per tar) and no stats read whole (one task, as for a
    source that names no parts): the same images, keys, captions and skips in each split, held out by key."""
    src = tmp_path / "i2d"
    write_img2dataset(src, [im[::4, ::4] for im in images], replace={9: b"not a jpeg"})
    bare = tmp_path / "bare"  # the same tars, without their stats
    bare.mkdir()
    for tar in src.glob("*.tar"):
        (bare / tar.name).write_bytes(tar.read_bytes())
    settings = {"samples_per_shard": 4, "block_size": 2, "test_fraction": 0.3, "test_seed": 3,
                "max_skip_fraction": 0.1, "progress": False}
    counted = pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "counted", **settings)
    per_tar = pipeline.ingest("webdataset", {"urls": str(bare)}, tmp_path / "per-tar", **settings)
    again = pipeline.ingest("webdataset", {"urls": str(bare)}, tmp_path / "again", **settings)
    times = {"created": True, "splits": {"__all__": {"shards": {"__all__": {"sha256", "bytes"}}}}}  # tars hold one
    assert again.model_dump(exclude=times) == per_tar.model_dump(exclude=times)  # deterministic
    monkeypatch.setattr(WebDatasetSource, "parts", lambda self, split: [])
    plan = pipeline.plan_ingest("webdataset", {"urls": str(bare)}, tmp_path / "one",
                                IngestSection(**{k: v for k, v in settings.items() if k != "progress"}))
    assert [(g.part, g.stop) for g in plan.groups] == [(None, None)]
    whole = pipeline.ingest("webdataset", {"urls": str(bare)}, tmp_path / "one", **settings)
    expected = _summary(counted, tmp_path / "counted")
    assert set(expected) == {"train", "test"} and expected["train"][0] + expected["test"][0] == N - 1
    assert _summary(per_tar, tmp_path / "per-tar") == expected
    assert _summary(whole, tmp_path / "one") == expected


def test_a_killed_ingest_of_tars_without_stats_keeps_the_finished_ones(tmp_path, images, monkeypatch):
    from pipeline import shards

    src = tmp_path / "i2d"
    written = write_img2dataset(src, images, stats=False)
    real, calls = shards.SplitWriter, []

    def dies_on_third_tar(*args, **kwargs):
        calls.append(args[1:3])  # (split, first shard)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the ingest is killed while writing its third input tar's shards
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "SplitWriter", dies_on_third_tar)
    with pytest.raises(KeyboardInterrupt):
        pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", samples_per_shard=4, progress=False)
    assert not (tmp_path / "shards" / "index.json").exists()
    finished = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("train-*.tar")}
    assert sorted(finished) == ["train-000000.tar", "train-000001.tar", "train-001000.tar", "train-001001.tar"]
    calls.clear()
    monkeypatch.setattr(shards, "SplitWriter", lambda *a, **k: (calls.append(a[1:3]), real(*a, **k))[1])
    index = pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", samples_per_shard=4,
                            progress=False)
    assert calls == [("train", 2 * PART_SHARDS)]  # only the third tar was written again
    assert {n: (tmp_path / "shards" / n).stat().st_mtime_ns for n in finished} == finished
    assert index.splits["train"].num_samples == N
    assert pipeline.read_captions(tmp_path / "shards", "train") == [(w.key, w.caption) for w in written]


def test_a_tar_that_fills_more_than_its_shard_numbers_stops_before_the_next_ones(tmp_path, images, monkeypatch):
    src = tmp_path / "i2d"
    write_img2dataset(src, images, stats=False)
    monkeypatch.setattr(plan_module, "PART_SHARDS", 1)
    monkeypatch.setattr(group_module, "PART_SHARDS", 1)
    with pytest.raises(SourceError, match=r"part .*00000.tar of split 'train' holds more images than its 1 shards "
                                          r"of 4 in split 'train': raise ingest.samples_per_shard"):
        pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", samples_per_shard=4, progress=False)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == ["train-000000.tar"]


def test_a_member_that_does_not_decode_is_skipped_naming_its_shard_and_key(tmp_path, images):
    src = tmp_path / "i2d"
    garbage, cut = b"<html>404 not found</html>", jpeg(images[12])[:900]
    written = write_img2dataset(src, images, replace={4: garbage, 12: cut})
    bad = [written[4], written[12]]
    options = {"urls": str(src)}
    index = pipeline.ingest("webdataset", options, tmp_path / "shards", max_skip_fraction=0.2, progress=False)
    assert index.splits["train"].num_samples == N - 2 and index.skipped == {"corrupt": 2}
    report = [json.loads(line) for line in (tmp_path / "shards" / "skipped.jsonl").read_text().splitlines()]
    assert [r["key"] for r in report] == [w.key for w in bad]
    for line, w in zip(report, bad, strict=True):
        assert f"in {w.shard}: {w.key}.jpg:" in line["reason"]
    assert _stored_keys(tmp_path / "shards") == [w.key for w in written if w not in bad]
    with pytest.raises(SourceError, match=f"input '{bad[0].key}' of split 'train' was rejected \\(corrupt\\): in "
                                          f".*{bad[0].shard.name}.*ingest.on_error=skip"):
        pipeline.ingest("webdataset", options, tmp_path / "fail", on_error="fail", progress=False)


def test_a_sample_without_an_image_member_is_rejected_with_its_members(tmp_path):
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        sink.write({"__key__": "a", "txt": "only a caption"})
    (item,) = pipeline.build_source("webdataset", {"urls": str(tmp_path)}).records("train")
    assert item.kind == "missing" and "no image member (jpg, jpeg, png, webp); it has ['txt']" in item.reason


@pytest.mark.parametrize("stats", [True, False])
def test_a_tar_cut_inside_a_member_is_named(tmp_path, images, stats):
    src = tmp_path / "i2d"
    write_img2dataset(src, images, stats=stats)
    shard = src / "00001.tar"
    shard.write_bytes(shard.read_bytes()[:20000])
    with pytest.raises(SourceError, match=f"{shard} is truncated or corrupt after 1 sample\\(s\\) \\(.*\\); "
                                          "download it again, or leave it out of source.options.urls"):
        pipeline.ingest("webdataset", {"urls": str(src)}, tmp_path / "shards", samples_per_shard=4, progress=False)


def test_a_tar_cut_between_samples_is_caught_by_its_stats(tmp_path, images):
    """tar reads a file cut at a member boundary as complete; img2dataset's successes count does not agree."""
    src = tmp_path / "i2d"
    write_img2dataset(src, images)
    shard = src / "00001.tar"
    third = [m for m in tarfile.open(shard).getmembers() if m.name.endswith(".jpg")][2]
    shard.write_bytes(shard.read_bytes()[:third.offset])
    source = pipeline.build_source("webdataset", {"urls": str(src)})
    with pytest.raises(SourceError, match=f"{shard} holds only 2, fewer than the 6 samples its _stats.json gives"):
        list(source.records("train"))
    assert len(list(pipeline.build_source("webdataset", {"urls": str(src), "use_stats": False})
                    .records("train"))) == N - 4


def test_stats_that_disagree_with_their_shard_or_do_not_parse_are_named(tmp_path, images):
    src = tmp_path / "i2d"
    write_img2dataset(src, images)
    stats = src / "00000_stats.json"
    stats.write_text(json.dumps({**json.loads(stats.read_text()), "successes": 5}))
    source = pipeline.build_source("webdataset", {"urls": str(src)})
    assert source.num_records("train") == N - 2
    with pytest.raises(SourceError, match=f"{src / '00000.tar'} holds more than the 5 samples its _stats.json gives"):
        list(source.records("train", 0, 5))  # a range that ends with the shard reads it to its end
    stats.write_text("{truncated")  # read again: a replaced stats file is seen by the next source object
    with pytest.raises(SourceError, match=f"{stats} is not an img2dataset stats file .*use_stats=false"):
        pipeline.build_source("webdataset", {"urls": str(src)}).splits()


def test_urls_that_name_no_shard_say_what_is_there(tmp_path, i2d):
    src, _ = i2d

    def splits(urls):
        return pipeline.build_source("webdataset", {"urls": urls}).splits()

    with pytest.raises(SourceError, match=f"{src}/00003.tar does not exist; {src} holds 3 .tar files \\(00000.tar "
                                          "\\.\\. 00002.tar\\)\\. Fix source.options.urls"):
        splits(f"{src}/{{00000..00004}}.tar")
    with pytest.raises(SourceError, match=f"names a directory {tmp_path}/nowhere that does not exist"):
        splits(str(tmp_path / "nowhere" / "{00000..00001}.tar"))
    (tmp_path / "empty").mkdir()
    for urls in (str(tmp_path / "empty"), str(tmp_path / "empty" / "*.tar")):
        with pytest.raises(SourceError, match="no .tar file matches .*; check source.options.urls"):
            splits(urls)
    for bad in ([], "", {"train": []}):
        with pytest.raises(SourceError, match="source.options.urls: .*names no shards"):
            splits(bad)
    with pytest.raises(SourceError, match="source.options.image_keys: .*at least 1 item"):
        pipeline.build_source("webdataset", {"urls": str(src), "image_keys": []})
    with pytest.raises(SourceError, match="source.options.storage_options: .*client_kwargs.aws_secret_access_key "
                                          "would be written into index.json"):
        pipeline.build_source("webdataset", {"urls": str(src), "storage_options": {
            "client_kwargs": {"aws_secret_access_key": "x"}}})


def test_brace_patterns_globs_lists_and_splits(i2d):
    src, written = i2d
    by_shard = {n: [w.key for w in written if w.shard.name == f"{n:05d}.tar"] for n in range(3)}

    def keys(urls, split="train"):
        return [r.key for r in pipeline.build_source("webdataset", {"urls": urls}).records(split)]

    assert keys(f"{src}/{{00000..00001}}.tar") == by_shard[0] + by_shard[1]
    assert keys(f"{src}/0000[12].tar") == by_shard[1] + by_shard[2]
    assert keys([f"{src}/00002.tar", f"{src}/00000.tar"]) == by_shard[2] + by_shard[0]  # a list keeps its order
    assert keys(f"pipe:cat {src}/00001.tar") == by_shard[1]  # webdataset's gopen runs the command
    splits = {"train": f"{src}/{{00000..00001}}.tar", "test": f"{src}/00002.tar"}
    source = pipeline.build_source("webdataset", {"urls": splits})
    assert source.splits() == ["train", "test"] and source.num_records("test") == len(by_shard[2])
    assert keys(splits, "test") == by_shard[2]
    with pytest.raises(SourceError, match="00002.tar is named twice \\(in splits 'train' and 'test'\\)"):
        pipeline.build_source("webdataset", {"urls": {"train": str(src), "test": f"{src}/00002.tar"}}).splits()
    with pytest.raises(SourceError, match="00001.tar is named twice \\(in split 'train'\\)"):
        pipeline.build_source("webdataset", {"urls": [str(src), f"{src}/00001.tar"]}).splits()


def test_labels_from_a_member_of_a_plain_webdataset(tmp_path, images):
    """Not only img2dataset's layout: ImageNet-style shards with a .cls member and PNG images."""
    (tmp_path / "in").mkdir()
    with wds.ShardWriter(str(tmp_path / "in" / "part-%03d.tar"), maxcount=3, verbose=0) as sink:
        for i, image in enumerate(images[:7]):
            buf = io.BytesIO()
            Image.fromarray(image[::4, ::4]).save(buf, format="PNG")
            sink.write({"__key__": f"n{i:03d}", "png": buf.getvalue(), "cls": str(i % 3)})
    options = {"urls": str(tmp_path / "in"), "label_key": "cls"}
    pipeline.ingest("webdataset", options, tmp_path / "shards", progress=False)
    stored, labels = pipeline.read_split(tmp_path / "shards", "train")
    assert labels.tolist() == [i % 3 for i in range(7)]
    np.testing.assert_array_equal(stored, np.stack([im[::4, ::4] for im in images[:7]]))


def test_shards_in_an_s3_bucket(s3_server, i2d, tmp_path):
    import fsspec

    src, written = i2d
    storage = {"endpoint_url": s3_server}
    fs = fsspec.filesystem("s3", **storage)
    fs.put(f"{src}/", "shards/i2d/", recursive=True)
    for urls in ("s3://shards/i2d/{00000..00002}.tar", "s3://shards/i2d", "s3://shards/i2d/"):
        source = pipeline.build_source("webdataset", {"urls": urls, "storage_options": storage})
        assert source.num_records("train") == N  # the stats files read from the bucket
    options = {"urls": "s3://shards/i2d/{00000..00002}.tar", "storage_options": storage}
    index = pipeline.ingest("webdataset", options, tmp_path / "shards", samples_per_shard=8, progress=False)
    assert len(index.splits["train"].shards) == 3
    images, _ = pipeline.read_split(tmp_path / "shards", "train")
    np.testing.assert_array_equal(images, np.stack([_decoded(w.jpg) for w in written]))
    assert _stored_keys(tmp_path / "shards") == [w.key for w in written]
    with pytest.raises(SourceError, match="s3://shards/i2d/00003.tar does not exist; s3://shards/i2d holds 3 .tar"):
        pipeline.build_source("webdataset", {"urls": "s3://shards/i2d/{00000..00003}.tar",
                                             "storage_options": storage}).splits()


def _has_pyarrow() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True
