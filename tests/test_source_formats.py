"""The files people have: every still-image format in a folder, 0/1 masks and MATLAB files as arrays, CIFAR as
its archive extracts. Tiny real files written in tmp_path."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
from PIL import Image
from support.data import rng_images, write_cifar10_bin

import pipeline
from pipeline import SourceError
from pipeline.sources import arrays as arrays_module

# ---- imagefolder: formats, files without a suffix, EXIF, modes


def _save(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def test_default_extensions_come_from_pillows_registry():
    from pipeline.sources.imagefolder import default_extensions

    extensions = default_extensions()
    assert {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".pgm", ".ppm"} <= set(extensions)
    assert not {".pdf", ".h5", ".mpg", ".eps"} & set(extensions)  # save-only, identify-only, needs Ghostscript


def test_imagefolder_reads_every_pillow_format_and_identifies_files_without_a_known_suffix(tmp_path):
    gray = rng_images(1, (6, 5))[0]
    rgb = rng_images(1, (6, 5, 3), seed=1)[0]
    other = rng_images(1, (6, 5, 3), seed=2)[0]
    _save(tmp_path / "face.pgm", Image.fromarray(gray))
    _save(tmp_path / "subject01", Image.fromarray(gray), format="GIF")  # no suffix: a GIF by its content
    _save(tmp_path / "subject02.happy", Image.fromarray(gray), format="GIF")  # Yale's naming: a suffix Pillow lacks
    _save(tmp_path / "pic.bmp", Image.fromarray(rgb))
    _save(tmp_path / "pic.webp", Image.fromarray(rgb), lossless=True)
    _save(tmp_path / "frames.tif", Image.fromarray(rgb), save_all=True, append_images=[Image.fromarray(other)])
    _save(tmp_path / "frames.gif", Image.fromarray(gray), save_all=True, append_images=[Image.fromarray(255 - gray)])
    (tmp_path / "README").write_text("faces, 6x5, one per subject\n")  # not images: ignored, not "corrupt"
    (tmp_path / "labels.csv").write_text("file,label\nface.pgm,0\n")
    records = {r.key: r for r in pipeline.build_source("imagefolder", {"root": str(tmp_path)}).records("train")}
    assert sorted(records) == ["face.pgm", "frames.gif", "frames.tif", "pic.bmp", "pic.webp", "subject01",
                               "subject02.happy"]
    assert all(isinstance(r, pipeline.Record) for r in records.values())
    np.testing.assert_array_equal(records["face.pgm"].image, gray[..., None])
    for name in ("subject01", "subject02.happy", "frames.gif"):  # gray GIFs: every channel holds the gray exactly
        image = records[name].image
        assert all(np.array_equal(image[..., c], gray) for c in range(image.shape[2])), name
    for name in ("pic.bmp", "pic.webp", "frames.tif"):  # the first frame of a multi-frame file
        np.testing.assert_array_equal(records[name].image, rgb, err_msg=name)
    ignoring = pipeline.build_source("imagefolder", {"root": str(tmp_path), "identify_unknown": False})
    assert "subject01" not in {r.key for r in ignoring.records("train")}


def test_imagefolder_converts_16_bit_cmyk_palette_alpha_and_applies_exif_orientation(tmp_path):
    deep = np.array([[0, 1, 128, 129], [257, 32896, 65280, 65535]], np.uint16)
    _save(tmp_path / "deep.png", Image.fromarray(deep))
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    _save(tmp_path / "cmyk.jpg", Image.new("CMYK", (8, 8), (255, 0, 0, 0)), quality=100)  # cyan
    palette = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "P")
    palette.putpalette([v for i in range(16) for v in (i * 16, 0, 255 - i * 16)])
    _save(tmp_path / "palette.png", palette, transparency=0)
    upright = np.zeros((32, 16), np.uint8)
    upright[16:] = 255  # top half dark, bottom half bright, as it should be seen
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what a sideways camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    _save(tmp_path / "rotated.jpg", stored, exif=exif.tobytes(), quality=100)
    records = {r.key: r for r in pipeline.build_source("imagefolder", {"root": str(tmp_path)}).records("train")}
    assert all(isinstance(r, pipeline.Record) for r in records.values()), records
    # 16-bit: round(v * 255 / 65535) over the whole 16-bit range
    np.testing.assert_array_equal(records["deep.png"].image[..., 0], [[0, 0, 0, 1], [1, 128, 254, 255]])
    cyan = records["cmyk.jpg"].image
    assert cyan.shape == (8, 8, 3) and np.abs(cyan.astype(int) - [0, 255, 255]).max() <= 8
    rgba = records["palette.png"].image
    assert rgba.shape == (4, 4, 4) and rgba[0, 0, 3] == 0 and (rgba.reshape(-1, 4)[1:, 3] == 255).all()
    np.testing.assert_array_equal(rgba[0, 1, :3], [16, 0, 239])
    turned = records["rotated.jpg"].image[..., 0].astype(int)
    assert turned.shape == (32, 16) and turned[:14].max() < 30 and turned[18:].min() > 225


def test_imagefolder_a_broken_image_is_still_rejected_as_corrupt(tmp_path):
    _save(tmp_path / "ok.png", Image.fromarray(rng_images(1, (4, 4))[0]))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # an image suffix that does not decode
    items = list(pipeline.build_source("imagefolder", {"root": str(tmp_path)}).records("train"))
    assert [(type(i).__name__, i.key) for i in items] == [("Rejected", "bad.png"), ("Record", "ok.png")]
    assert items[0].kind == "corrupt"


# ---- arrays: binary masks


def test_arrays_binary_masks_are_stored_as_0_and_255_with_a_warning(tmp_path, caplog, monkeypatch):
    mask = np.random.default_rng(0).integers(0, 2, (6, 4, 5), dtype=np.uint8)
    np.save(tmp_path / "mask.npy", mask)
    options = {"files": {"train": str(tmp_path / "mask.npy")}}
    with caplog.at_level(logging.WARNING):
        records = list(pipeline.build_source("arrays", options).records("train"))
    np.testing.assert_array_equal(np.stack([r.image[..., 0] for r in records]), mask * 255)
    assert "binary mask, stored as 0 and 255" in caplog.text and "source.options.binary=keep" in caplog.text
    kept = list(pipeline.build_source("arrays", {**options, "binary": "keep"}).records("train"))
    np.testing.assert_array_equal(np.stack([r.image[..., 0] for r in kept]), mask)
    # a 2 in the last rows, past several scan chunks: not a mask, stored as it is
    monkeypatch.setattr(arrays_module, "_SCAN_BYTES", 40)
    dark = mask.copy()
    dark[-1, -1, -1] = 2
    np.save(tmp_path / "dark.npy", dark)
    dark_options = {"files": {"train": str(tmp_path / "dark.npy")}}
    records = list(pipeline.build_source("arrays", dark_options).records("train"))
    np.testing.assert_array_equal(np.stack([r.image[..., 0] for r in records]), dark)
    with pytest.raises(SourceError, match="values above 1, so it is not a 0/1 mask; set source.options.binary"):
        pipeline.build_source("arrays", {**dark_options, "binary": "scale"}).num_records("train")


def test_arrays_binary_mask_ingests_as_visible_images(tmp_path):
    mask = np.zeros((4, 6, 6), np.uint8)
    mask[:, 2:4, 2:4] = 1
    np.savez(tmp_path / "sprites.npz", imgs=mask)
    pipeline.ingest("arrays", {"files": {"train": str(tmp_path / "sprites.npz")}, "images_key": "imgs"},
                    tmp_path / "shards", progress=False)
    images, _ = pipeline.read_split(tmp_path / "shards", "train")
    assert set(np.unique(images)) == {0, 255}


# ---- arrays: npz with object arrays, MATLAB files


def _dsprites_like(path):
    imgs = np.random.default_rng(0).integers(0, 2, (5, 4, 4), dtype=np.uint8)
    metadata = np.array({"description": "dSprites", "latents_names": ("color", "shape")}, dtype=object)
    np.savez(path, imgs=imgs, latents_classes=np.arange(5), metadata=metadata)  # metadata is pickled by numpy
    return imgs


def test_arrays_npz_reads_only_the_requested_keys_beside_an_object_array(tmp_path):
    imgs = _dsprites_like(tmp_path / "dsprites.npz")
    options = {"files": {"train": str(tmp_path / "dsprites.npz")}, "images_key": "imgs",
               "labels_key": "latents_classes"}
    records = list(pipeline.build_source("arrays", options).records("train"))
    np.testing.assert_array_equal(np.stack([r.image[..., 0] for r in records]), imgs * 255)
    assert [r.label for r in records] == [0, 1, 2, 3, 4]
    with pytest.raises(SourceError, match="array 'metadata' in .* is an object array") as err:
        pipeline.build_source("arrays", {**options, "images_key": "metadata"}).num_records("train")
    assert "pickle" not in str(err.value)


def test_arrays_reads_a_mat_file_through_scipy(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy (a scikit-learn dependency) is not installed")
    images = rng_images(3, (4, 5))
    scipy_io.savemat(tmp_path / "faces.mat", {"faces": images, "ids": np.array([7, 8, 9])})  # ids: a (1, 3) row
    options = {"files": {"train": str(tmp_path / "faces.mat")}, "images_key": "faces", "labels_key": "ids"}
    records = list(pipeline.build_source("arrays", options).records("train"))
    np.testing.assert_array_equal(np.stack([r.image[..., 0] for r in records]), images)
    assert [r.label for r in records] == [7, 8, 9]
    with pytest.raises(SourceError, match=r"has no array 'images' \(it has \['faces', 'ids'\]\)"):
        pipeline.build_source("arrays", {**options, "images_key": "images"}).num_records("train")


def test_arrays_mat_files_without_scipy_v73_and_foreign_files_say_what_they_are(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io", reason="scipy (a scikit-learn dependency) is not installed")
    scipy_io.savemat(tmp_path / "faces.mat", {"images": rng_images(2, (4, 4))})
    # a v7.3 file: MATLAB's text header with version 0x0200 (HDF5 follows)
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8) + b"\x00\x02IM"
    (tmp_path / "big.mat").write_bytes(header + bytes(512))
    (tmp_path / "notes.npy").write_text("not an array\n")

    def message(name):
        with pytest.raises(SourceError) as err:
            pipeline.build_source("arrays", {"files": {"train": str(tmp_path / name)}}).num_records("train")
        assert "pickle" not in str(err.value)
        return str(err.value)

    assert "is a MATLAB v7.3 file (HDF5 inside)" in message("big.mat")
    assert "is not a .npy, .npz or MATLAB .mat file" in message("notes.npy")
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # as if scipy were not installed
    text = message("faces.mat")
    assert "is a MATLAB .mat file; install scipy" in text and "np.savez(" in text


# ---- cifar: the archive's folder, subset files


def test_cifar_root_above_the_extracted_archive_folder(tmp_path):
    images = rng_images(3, (32, 32, 3))
    folder = tmp_path / "downloads" / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    write_cifar10_bin(folder / "data_batch_1.bin", images, np.array([1, 2, 3]))
    write_cifar10_bin(folder / "test_batch.bin", images[:2], np.array([4, 5]))
    source = pipeline.build_source("cifar", {"root": str(tmp_path / "downloads")})
    assert source.splits() == ["train", "test"]
    np.testing.assert_array_equal(np.stack([r.image for r in source.records("train")]), images)
    (tmp_path / "downloads" / "cifar-100-binary").mkdir()
    (tmp_path / "downloads" / "cifar-100-binary" / "train.bin").write_bytes(bytes(3074))
    with pytest.raises(SourceError, match="several CIFAR folders.*set source.options.root to one of them"):
        pipeline.build_source("cifar", {"root": str(tmp_path / "downloads")}).splits()
    only100 = pipeline.build_source("cifar", {"root": str(tmp_path / "downloads"), "variant": "cifar100"})
    assert only100.num_records("train") == 1


def test_cifar_a_test_file_under_another_name_is_reported_as_a_subset(tmp_path, caplog):
    write_cifar10_bin(tmp_path / "data_batch_1.bin", rng_images(2, (32, 32, 3)), np.array([1, 2]))
    write_cifar10_bin(tmp_path / "test_batch_first1000.bin", rng_images(3, (32, 32, 3)), np.array([3, 4, 5]))
    with caplog.at_level(logging.WARNING):
        assert pipeline.build_source("cifar", {"root": str(tmp_path)}).num_records("test") == 3
    assert "test_batch_first1000.bin, which is not an official cifar10 file name: it holds 3 records" in caplog.text
    assert "the official test file holds 10000" in caplog.text
    assert "data_batch_1.bin holds 2 records where the official file holds 10000" in caplog.text
    write_cifar10_bin(tmp_path / "test_batch.bin", rng_images(3, (32, 32, 3)), np.array([3, 4, 5]))
    with pytest.raises(SourceError, match="official test_batch.bin and also test_batch_first1000.bin.*move it out"):
        pipeline.build_source("cifar", {"root": str(tmp_path)}).splits()

