"""The files people have: every still-image format in a folder, 0/1 masks and MATLAB files as arrays, CIFAR as
its archive extracts. Tiny real files written in tmp_path."""

from __future__ import annotations

import numpy as np
from PIL import Image
from test_sources import _rng_images

import pipeline

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
    gray = _rng_images(1, (6, 5))[0]
    rgb = _rng_images(1, (6, 5, 3), seed=1)[0]
    other = _rng_images(1, (6, 5, 3), seed=2)[0]
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
    _save(tmp_path / "ok.png", Image.fromarray(_rng_images(1, (4, 4))[0]))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # an image suffix that does not decode
    items = list(pipeline.build_source("imagefolder", {"root": str(tmp_path)}).records("train"))
    assert [(type(i).__name__, i.key) for i in items] == [("Rejected", "bad.png"), ("Record", "ok.png")]
    assert items[0].kind == "corrupt"
