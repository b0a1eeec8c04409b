"""The registered aekl model at any resolution, bounded by pixels: images of any size its factor f divides and
spatial latents of any size, as `AutoencoderKL` takes them; `max_pixels` refused before any compute, in-process and
over REST; a model whose config predates the limit gets its default; and diffusers' tiling past `tile_size`.
A tiny aekl (f4, trained at 32 x 24) saved to tmp_path and loaded as MLflow loads it."""

from __future__ import annotations

import json
import re
import shutil

import mlflow
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from fastapi.testclient import TestClient
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.pyfunc import scoring_server
from support.serving import strict_json

from vae.models.spec import build_from_spec, model_spec
from vae.registry.packaging import save_model
from vae.registry.pyfunc import ServingLimits

SPEC = model_spec("aekl", (3, 32, 24), 4, channels=[8, 16, 16], layers_per_block=1, norm_groups=4, attention=True,
                  likelihood="gaussian")
F = 4  # its down-sampling factor; a tile is a multiple of 4 f = 16
# Small, so the tests cross them cheaply: three 64 x 64 images fill max_pixels; untiled unless a test loads it tiled.
LIMITS = ServingLimits(max_images=4, max_pixels=3 * 64 * 64, chunk_rows=2, tile_size=0)
RNG = np.random.default_rng(0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory of the tiny aekl saved with LIMITS, the module it was saved from)."""
    torch.manual_seed(0)
    model = build_from_spec(SPEC).eval()
    with torch.no_grad():  # not the initial weights only
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return save_model(model, SPEC, tmp_path_factory.mktemp("aekl") / "m", limits=LIMITS), model


@pytest.fixture(scope="module")
def pyfunc(saved):
    return mlflow.pyfunc.load_model(str(saved[0]))


def images(n: int, h: int, w: int) -> np.ndarray:
    return RNG.random((n, 3, h, w), dtype=np.float32)


class Calls:
    """The (N, C, H, W) shapes diffusers' encoder and decoder were called on, through forward pre-hooks."""

    def __init__(self, pyfunc):
        self.vae = pyfunc.unwrap_python_model().model.vae
        self.encoder: list[tuple[int, ...]] = []
        self.decoder: list[tuple[int, ...]] = []

    def __enter__(self) -> Calls:
        self.hooks = [part.register_forward_pre_hook(lambda _, args, seen=seen: seen.append(tuple(args[0].shape)))
                      for part, seen in ((self.vae.encoder, self.encoder), (self.vae.decoder, self.decoder))]
        return self

    def __exit__(self, *_) -> None:
        for hook in self.hooks:
            hook.remove()


@pytest.mark.parametrize("side", [(32, 24), (64, 64), (16, 48), (4, 4), (128, 8)])
def test_any_size_f_divides_encodes_and_decodes_as_the_module_does(pyfunc, saved, side):
    model, (h, w) = saved[1], side
    x = images(2, h, w)
    latents = pyfunc.predict(x, params={"mode": "encode"})
    assert latents.shape == (2, 4, h // F, w // F)
    with torch.no_grad():
        expected = model.encode_latents(torch.from_numpy(x))
        recon = model.decode_latents(expected).numpy()
    # one image per chunk past the training size: float sums per image, in another order than one batch of two
    np.testing.assert_allclose(latents, expected.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(pyfunc.predict(x), recon, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(pyfunc.predict(latents, params={"mode": "decode"}), pyfunc.predict(x))


def test_spatial_latents_of_any_size_decode_and_flat_ones_keep_the_training_size(pyfunc, saved):
    z = RNG.standard_normal((2, 4, 5, 7)).astype(np.float32)
    out = pyfunc.predict(z, params={"mode": "decode"})
    assert out.shape == (2, 3, 20, 28)
    with torch.no_grad():
        np.testing.assert_allclose(out, saved[1].decode_latents(torch.from_numpy(z)).numpy(), rtol=0, atol=1e-5)
    flat = RNG.standard_normal((2, 4 * 8 * 6)).astype(np.float32)  # the contract's (N, D), at 32 x 24
    np.testing.assert_array_equal(pyfunc.predict(flat, params={"mode": "decode"}),
                                  pyfunc.predict(flat.reshape(2, 4, 8, 6), params={"mode": "decode"}))
    assert pyfunc.predict(3, params={"mode": "sample"}).shape == (3, 3, 32, 24)  # samples: the training shape


LATENTS_EXPECTED = ("mode 'decode' expects latents of shape (N, 4, h, w), or (N, 192) flattened at the training "
                    "size (4, 8, 6)")
# (input, params, the one-line reason): a shape refusal names the shape expected, multiples of f.
BAD_SHAPES = {
    "side not a multiple of f": (images(1, 30, 24), {"mode": "encode"}, "mode 'encode' expects images of shape "
                                 "(N, 3, H, W), H and W multiples of 4, got (1, 3, 30, 24)"),
    "wrong channels": (np.zeros((1, 1, 32, 24), np.float32), {}, "mode 'reconstruct' expects images of shape "
                       "(N, 3, H, W), H and W multiples of 4, got (1, 1, 32, 24)"),
    "empty sides": (np.zeros((1, 3, 0, 0), np.float32), {}, "H and W multiples of 4, got (1, 3, 0, 0)"),
    "no images": (np.zeros((0, 3, 32, 24), np.float32), {"mode": "encode"}, "mode 'encode' expects images of "
                  "shape (N, 3, H, W), H and W multiples of 4 with N at least 1, got (0, 3, 32, 24)"),
    "no latents": (np.zeros((0, 4, 8, 6), np.float32), {"mode": "decode"}, f"{LATENTS_EXPECTED} with N at least 1"),
    "latent channels": (np.zeros((1, 3, 8, 6), np.float32), {"mode": "decode"},
                        f"{LATENTS_EXPECTED}, got (1, 3, 8, 6)"),
    "flat latents of another size": (np.zeros((1, 100), np.float32), {"mode": "decode"},
                                     f"{LATENTS_EXPECTED}, got (1, 100)"),
}


@pytest.mark.parametrize("case", BAD_SHAPES)
def test_a_shape_f_does_not_divide_is_refused_naming_the_shape_expected(pyfunc, case):
    data, params, reason = BAD_SHAPES[case]
    with pytest.raises(MlflowException, match=re.escape(reason)) as caught:
        pyfunc.predict(data, params=params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def over(n: int, h: int, w: int) -> str:
    return (f"takes at most {3 * 64 * 64} pixels per request (the model's max_pixels), got {n} images of {h} x {w} = "
            f"{n * h * w}; send fewer or smaller images per request, or raise max_pixels")


# (input, params, the reason): every one over max_pixels and within max_images and max_samples.
OVER_PIXELS = {
    "images": (images(4, 64, 64), {"mode": "encode"}, "mode 'encode' " + over(4, 64, 64)),
    "one large image": (np.broadcast_to(np.float32(0.5), (1, 3, 128, 128)), {}, "mode 'reconstruct' " +
                        over(1, 128, 128)),
    "latents decoding to large images": (np.zeros((1, 4, 32, 32), np.float32), {"mode": "decode"},
                                         "mode 'decode' " + over(1, 128, 128)),
    "samples": (17, {"mode": "sample"}, "mode 'sample' " + over(17, 32, 24)),  # 16 fit: 16 x 768 = 3 x 64 x 64
}


@pytest.mark.parametrize("case", OVER_PIXELS)
def test_over_max_pixels_is_refused_before_any_compute(pyfunc, case):
    data, params, reason = OVER_PIXELS[case]
    with Calls(pyfunc) as calls, pytest.raises(MlflowException, match=re.escape(reason)) as caught:
        pyfunc.predict(data, params=params)
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE" and "\n" not in caught.value.message
    assert calls.encoder == calls.decoder == []
    assert pyfunc.predict(images(3, 64, 64), params={"mode": "encode"}).shape == (3, 4, 16, 16)  # at the limit
    assert len(pyfunc.predict(16, params={"mode": "sample"})) == 16


def test_over_rest_any_size_answers_and_too_many_pixels_is_a_400(pyfunc):
    app = TestClient(scoring_server.init(pyfunc))

    def invoke(inputs, params: dict) -> tuple[int, dict]:
        response = app.post("/invocations", content=json.dumps({"inputs": inputs, "params": params}),
                            headers={"Content-Type": "application/json"})
        return response.status_code, strict_json(response.text)

    x = images(1, 64, 40)
    status, body = invoke(x.tolist(), {"mode": "encode"})
    assert status == 200
    np.testing.assert_array_equal(np.array(body["predictions"], np.float32),
                                  pyfunc.predict(x, params={"mode": "encode"}))
    status, body = invoke(images(4, 64, 64).tolist(), {"mode": "encode"})
    assert status == 400 and body["error_code"] == "INVALID_PARAMETER_VALUE" and "stack_trace" not in body
    assert over(4, 64, 64) in body["message"].splitlines()[-1]


def test_larger_images_run_fewer_to_a_chunk(pyfunc):
    """chunk_rows 2 at the training size (32 x 24): a chunk never holds more pixels than two training images."""
    for (h, w), rows in {(32, 24): 2, (16, 24): 4, (64, 48): 1}.items():
        with Calls(pyfunc) as calls:
            pyfunc.predict(images(4, h, w), params={"mode": "encode"})
        assert [shape[0] for shape in calls.encoder] == [rows] * (4 // rows), (h, w)


def test_a_model_logged_before_max_pixels_gets_the_default(saved, tmp_path):
    old = shutil.copytree(saved[0], tmp_path / "old")
    meta = Model.load(str(old))
    for key in ("max_pixels", "tile_size"):
        del meta.flavors["python_function"]["config"][key]
    meta.save(str(old / "MLmodel"))
    limits = mlflow.pyfunc.load_model(str(old)).unwrap_python_model().limits
    # its own limits kept, the new ones defaulted (dumped: MLflow loads the model's file as a module of its own)
    assert limits.model_dump() == ServingLimits(max_images=4, chunk_rows=2).model_dump()
    huge = np.broadcast_to(np.float32(0.5), (1, 3, 4096, 4100))  # a view: 200 MB never allocated
    with pytest.raises(MlflowException, match=re.escape("takes at most 16777216 pixels per request (the model's "
                                                        "max_pixels), got 1 images of 4096 x 4100 = 16793600")):
        mlflow.pyfunc.load_model(str(old)).predict(huge, params={"mode": "encode"})


TILE = 16  # px: 4 latent pixels at f4, a quarter of which (1) blends


def test_tiled_agrees_with_untiled_within_one_tile_and_is_diffusers_own_tiling_past_it(pyfunc, saved):
    tiled = mlflow.pyfunc.load_model(str(saved[0]), model_config={"tile_size": TILE})
    # Where tiles do not matter (an image within one tile), the tiled model is the untiled one, bit for bit.
    small = images(2, TILE, 12)
    for mode in ("encode", "reconstruct"):
        np.testing.assert_array_equal(tiled.predict(small, params={"mode": mode}),
                                      pyfunc.predict(small, params={"mode": mode}))
    # Past it: every encoder and decoder call sees one tile at most, and the result is diffusers' own tiling.
    x = images(1, 52, 20)
    with Calls(tiled) as calls:
        latents = tiled.predict(x, params={"mode": "encode"})
        recon = tiled.predict(latents, params={"mode": "decode"})
    assert latents.shape == (1, 4, 13, 5) and recon.shape == (1, 3, 52, 20)
    assert len(calls.encoder) > 1 and max(max(s[2:]) for s in calls.encoder) <= TILE
    assert len(calls.decoder) > 1 and max(max(s[2:]) for s in calls.decoder) <= TILE // F
    reference = AutoencoderKL(**saved[1].vae.config).eval()
    reference.load_state_dict(saved[1].vae.state_dict())
    reference.enable_tiling()
    reference.tile_sample_min_size, reference.tile_latent_min_size = TILE, TILE // F
    with torch.no_grad():
        mean = reference.encode(torch.from_numpy(x) * 2 - 1).latent_dist.mean
        images_out = ((reference.decode(mean).sample + 1) / 2).clamp(0, 1)
    np.testing.assert_allclose(latents, mean.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(recon, images_out.numpy(), rtol=0, atol=1e-6)
    assert not np.allclose(latents, pyfunc.predict(x, params={"mode": "encode"}), atol=1e-3)  # it did tile
    # tile_size 0 (the saved one) never tiles: the encoder sees the whole image
    with Calls(pyfunc) as calls:
        pyfunc.predict(x, params={"mode": "encode"})
    assert calls.encoder == [(1, 3, 52, 20)]


def test_a_tile_size_that_is_not_a_multiple_of_4f_is_refused_at_load(saved):
    with pytest.raises(ValueError, match=re.escape("tile_size 24 must be 0 (never tile) or a multiple of 4 f = 16")):
        mlflow.pyfunc.load_model(str(saved[0]), model_config={"tile_size": 24})
