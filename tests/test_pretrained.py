"""`--model.pretrained` in the forms people have the weights (vae/models/pretrained.py): a diffusers folder, a
Hugging Face repo id from the local cache (a pipeline's `vae` subfolder too), and one .safetensors file in the
original LDM (SD, SDXL) or BFL (FLUX ae) layout. Each is built here from a small random AutoencoderKL, and
vaepipe's model must give what diffusers' own loading of the same weights gives. Nothing touches the network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file
from support.original_layout import hf_cache, to_original
from support.training import in_process, train

from vae.config import ConfigError, validate
from vae.models import build_model
from vae.models.spec import build_from_spec, portable_spec
from vae.training import checkpoint
from vae.training.trained import load_checkpoint, resolve_model

SHAPE = (3, 32, 32)
LEVELS = (32, 32, 64)  # f4; 32 GroupNorm groups, as the original code (a single file does not record them)


def random_vae(latent: int = 4, quant_conv: bool = True, in_channels: int = 3, levels=LEVELS, groups: int = 32,
               seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=in_channels, out_channels=in_channels, block_out_channels=levels,
                        layers_per_block=1, latent_channels=latent, norm_num_groups=groups,
                        down_block_types=("DownEncoderBlock2D",) * len(levels),
                        up_block_types=("UpDecoderBlock2D",) * len(levels), use_quant_conv=quant_conv,
                        use_post_quant_conv=quant_conv).eval()
    with torch.no_grad():  # every weight counts, none left at a constant initial value
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vae


def save_single_file(vae: AutoencoderKL, path: Path, prefix: str = "", extra: dict | None = None,
                     dtype: torch.dtype = torch.float32) -> Path:
    original = to_original(vae.state_dict(), len(vae.config.block_out_channels))
    state = {prefix + k: v.to(dtype) for k, v in original.items()}
    save_file({**state, **(extra or {})}, path)
    return path


def cache_repo(tmp_path: Path, vae: AutoencoderKL, repo: str, subfolder: str = "") -> Path:
    """`vae` saved as a diffusers folder and put into a fresh Hugging Face cache (HF_HUB_CACHE) as `repo`."""
    folder = tmp_path / "saved"
    vae.save_pretrained(folder)
    inside = f"{subfolder}/" if subfolder else ""
    files = {f"{inside}{p.name}": p for p in folder.iterdir()}
    files["model_index.json" if subfolder else "README.md"] = folder / "config.json"  # a file beside it
    hf_cache(tmp_path / "hub", repo, files)
    return tmp_path / "hub"


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache of this test's own, and no network: a connection attempt fails the test."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read once at import; the library reads it here

    def refuse(*args, **kwargs):
        raise AssertionError("a connection was attempted: nothing may be downloaded")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return cache


def vaepipe_model(pretrained: str, shape=SHAPE, **section):
    """The model a run builds from `pretrained`: the section validated, resolved where training resolves it, built."""
    cfg = resolve_model(validate({"model": {"arch": "aekl", "pretrained": pretrained, **section}}))
    return build_model("aekl", shape, cfg.model.latent_dim, **cfg.model.constructor_options()).eval(), cfg.model


def assert_same_outputs(model, vae: AutoencoderKL, shape=SHAPE) -> None:
    """vaepipe's latents and reconstructions equal diffusers' `encode(2x - 1).latent_dist.mean` and its
    `(decode(z) + 1) / 2` within 1e-5, fp32."""
    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latent_dist.mean
        ours = model.encode_latents(x)
        assert (ours - z).abs().max() <= 1e-5
        images = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
        assert (model.decode_latents(z) - images).abs().max() <= 1e-5


# single files: form -> (random VAE options, key prefix, other tensors in the file, dtype, expected scale and shift)
FILES = {
    "ldm-whole-sd": ({}, "first_stage_model.", {"model.diffusion_model.out.2.bias": torch.zeros(4),
                                               "first_stage_model.loss.logvar": torch.zeros(())},
                     torch.float32, (0.18215, None)),
    "ldm-bare-fp16": ({}, "", {}, torch.float16, (0.18215, None)),
    "sdxl-whole": ({}, "first_stage_model.", {"conditioner.embedders.1.model.positional_embedding": torch.zeros(2, 2)},
                   torch.float32, (0.13025, None)),
    "flux-ae": ({"latent": 16, "quant_conv": False}, "", {}, torch.float32, (0.3611, 0.1159)),
    "sd3-whole": ({"latent": 16, "quant_conv": False}, "first_stage_model.",
                  {"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(2, 2)},
                  torch.float32, (1.5305, 0.0609)),
}


@pytest.mark.parametrize("form", sorted(FILES))
def test_a_single_file_in_an_original_layout_gives_diffusers_outputs(tmp_path, form):
    options, prefix, extra, dtype, (scale, shift) = FILES[form]
    source = random_vae(**options)
    name = "ae.safetensors" if form == "flux-ae" else "model.safetensors"
    path = save_single_file(source, tmp_path / name, prefix, extra, dtype)
    model, section = vaepipe_model(str(path))
    assert (list(section.channels), section.latent_dim, section.quant_conv, section.norm_groups) == (
        list(LEVELS), source.config.latent_channels, source.config.use_quant_conv, 32)
    assert (model.vae.config.scaling_factor, model.vae.config.shift_factor) == (scale, shift)
    # diffusers' own single-file loading of the same file, given the source's config as a local folder
    source.save_pretrained(tmp_path / "config")
    theirs = AutoencoderKL.from_single_file(str(path), config=str(tmp_path / "config"), local_files_only=True).eval()
    assert_same_outputs(model, theirs)
    if dtype == torch.float32:  # and the weights are the source's: the layout was inverted right
        assert_same_outputs(model, source)


def test_a_diffusers_folder_gives_diffusers_outputs(tmp_path):
    source = random_vae(latent=16, quant_conv=False)  # FLUX-like: no quant_conv, which the section now records
    source.save_pretrained(tmp_path / "vae")
    model, section = vaepipe_model(str(tmp_path), pretrained_subfolder="vae")
    assert section.quant_conv is False and model.vae.quant_conv is None
    assert_same_outputs(model, AutoencoderKL.from_pretrained(tmp_path / "vae"))


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`:UserWarning")  # diffusers' own lookup, not ours
@pytest.mark.parametrize("subfolder", ["", "vae"], ids=["vae-repo", "pipeline-repo"])
def test_a_repo_id_in_the_cache_gives_diffusers_outputs_offline(tmp_path, hub, subfolder):
    source = random_vae(seed=2)
    cache_repo(tmp_path, source, "org/tiny-vae", subfolder)
    model, section = vaepipe_model("org/tiny-vae", **({"pretrained_subfolder": subfolder} if subfolder else {}))
    theirs = AutoencoderKL.from_pretrained("org/tiny-vae", subfolder=subfolder or None, cache_dir=hub,
                                           local_files_only=True)
    assert_same_outputs(model, theirs)
    assert list(section.channels) == list(LEVELS) and section.pretrained == "org/tiny-vae"


def test_a_repo_not_in_the_cache_stops_at_once_with_one_line_naming_the_download(hub):
    with pytest.raises(ConfigError) as err:
        vaepipe_model("stabilityai/sd-vae-ft-mse")
    message = str(err.value)
    assert "\n" not in message and "nothing is downloaded" in message and str(hub) in message
    assert "`hf download stabilityai/sd-vae-ft-mse`" in message
    assert "`huggingface-cli download stabilityai/sd-vae-ft-mse`" in message
    with pytest.raises(ConfigError, match=r"run `hf download org/pipe --include 'vae/\*'`"):
        vaepipe_model("org/pipe", pretrained_subfolder="vae")
    assert not any(hub.iterdir())  # nothing was fetched or written


def test_a_subfolder_the_repo_lacks_is_named_with_the_folders_it_has(tmp_path, hub):
    cache_repo(tmp_path, random_vae(), "org/pipe", "vae")
    with pytest.raises(ConfigError, match=r"model.pretrained_subfolder 'vea' does not exist in 'org/pipe' \(cached "
                                          r"at .*\): its folders are vae"):
        vaepipe_model("org/pipe", pretrained_subfolder="vea")
    with pytest.raises(ConfigError, match=r"not a diffusers AutoencoderKL folder: no config.json .*give "
                                          r"model.pretrained_subfolder vae"):
        vaepipe_model("org/pipe")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickles_are_refused_with_the_fix(tmp_path, suffix):
    path = tmp_path / f"vae{suffix}"
    path.write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match=rf"is a pickle \({suffix}\): loading one runs code .* convert this one"):
        validate({"model": {"arch": "aekl", "pretrained": str(path)}})  # from the name: validation reads no disk


def test_what_is_not_weights_is_named(tmp_path, hub):
    save_file({"weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ConfigError, match=r"layout of this file is not recognised .*known layouts: LDM \(SD 1.x/2.x, "
                                          r"SDXL.*; BFL \(FLUX ae.safetensors"):
        vaepipe_model(str(tmp_path / "other.safetensors"))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match=r"is a file but not .safetensors"):
        vaepipe_model(str(tmp_path / "notes.txt"))
    with pytest.raises(ConfigError, match=r"is neither a local folder, a file, nor a Hugging Face repo id"):
        vaepipe_model(str(tmp_path / "no" / "such" / "place"))
    with pytest.raises(ConfigError, match=r"'gone.safetensors': no such file"):
        vaepipe_model("gone.safetensors")
    path = save_single_file(random_vae(), tmp_path / "vae.safetensors")
    with pytest.raises(ConfigError, match=r"is a single file: it has no subfolder 'vae'"):
        vaepipe_model(str(path), pretrained_subfolder="vae")
    with pytest.raises(ConfigError, match=r"model.pretrained_subfolder names a folder inside model.pretrained"):
        validate({"model": {"arch": "aekl", "pretrained_subfolder": "vae"}})


def test_a_single_file_fills_the_section_and_refuses_what_disagrees(tmp_path):
    path = save_single_file(random_vae(latent=16, quant_conv=False), tmp_path / "ae.safetensors")
    with pytest.raises(ConfigError, match=r"disagrees with model.latent_dim 4 \(the file has 16\), model.quant_conv "
                                          r"True \(the file has False\): leave those fields unset"):
        vaepipe_model(str(path), latent_dim=4, quant_conv=True)
    with pytest.raises(ValueError, match=r"has in_channels=3, the model section or data asks for 1"):
        vaepipe_model(str(path), shape=(1, 32, 32))
    with pytest.raises(ConfigError, match=r"model.norm_groups 32 must divide every entry of model.channels"):
        vaepipe_model(str(save_single_file(random_vae(levels=(8, 16, 16), groups=8), tmp_path / "narrow.safetensors")))
    # the file does not record its GroupNorm groups: a given norm_groups is the model's
    model, section = vaepipe_model(str(tmp_path / "narrow.safetensors"), norm_groups=8)
    assert section.norm_groups == 8 and model.vae.encoder.conv_norm_out.num_groups == 8


def test_fine_tuning_from_a_flux_layout_file_then_publishing_without_it(tmp_path, digits_shards, tracking_uri):
    """One epoch (5 steps) on the digits (8 x 8, one channel) from a BFL-layout file: the resolved config saved with
    the checkpoint describes the file's model, and once the file is gone the checkpoint still loads (what
    publishing does) and rebuilds from the spec a registered model carries."""
    source = random_vae(latent=2, quant_conv=False, in_channels=1, levels=(32, 32, 32))
    path = save_single_file(source, tmp_path / "ae.safetensors")
    out = tmp_path / "run"
    with in_process(tracking_uri):
        train(digits_shards, out, "--model.arch", "aekl", "--model.pretrained", str(path), "--loss.likelihood",
              "gaussian", "--train.epochs", "1")
    path.unlink()  # the post-training path needs only the checkpoint
    tuned, meta = load_checkpoint(checkpoint.latest(out))
    model = meta["config"]["model"]
    assert (model["channels"], model["quant_conv"], model["pretrained"]) == ([32, 32, 32], False, str(path))
    assert tuned.vae.quant_conv is None
    rebuilt = build_from_spec(portable_spec(meta["model_spec"]))
    rebuilt.load_state_dict(tuned.state_dict())
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(rebuilt.eval().encode_latents(x), tuned.encode_latents(x))
        assert not torch.equal(tuned.encode_latents(x), source.encode(x * 2 - 1).latent_dist.mean)  # it trained
