"""Where an aekl model starts from: `model.pretrained` in the forms people have the weights.

- A local diffusers folder (config.json + diffusion_pytorch_model.safetensors); `model.pretrained_subfolder` picks
  one inside it (the `vae` of a pipeline folder).
- A Hugging Face repo id (`stabilityai/sd-vae-ft-mse`), looked up in the local Hugging Face cache only
  (HF_HUB_CACHE, HF_HOME): nothing is downloaded at run time, and a repo that is not cached stops the run at once
  with the command that downloads it.
- One `.safetensors` file in an original layout, converted by diffusers' own single-file code
  (`AutoencoderKL.from_single_file`, given a config written here, so it never asks the Hub for one): LDM (SD 1.x /
  2.x, SDXL; the VAE's keys under `first_stage_model.` in a whole checkpoint, or bare in a VAE file) and BFL
  (FLUX's `ae.safetensors`: the same names without quant_conv, 16 channels). A file carries no config: its
  architecture is read from its tensors' shapes, except the GroupNorm groups, which no tensor records (the original
  code fixes 32: `model.norm_groups`); its latent scale and shift are those of the release it comes from.

Pickles (.ckpt, .bin, .pt, .pth) are refused: loading one runs code from the file.

`locate` turns `model.pretrained` into a `Pretrained` reading configs and safetensors headers only; its `load`
builds the AutoencoderKL. diffusers and huggingface_hub are imported inside the functions that use them: every
logged MLflow model imports this package (through vae.models.aekl), and only starting from pretrained weights needs
them here (diffusers' import alone costs ~2 s).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open
from torch import nn

from vae.models.options import refuse_pickle

VAE_PREFIXES = ("first_stage_model.", "vae.", "")  # a whole LDM checkpoint's, some trainers', a VAE file's
VAE_MODULES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")  # not `loss.` (LPIPS, discriminator)
SECTION_FIELDS = ("channels", "layers_per_block", "latent_dim", "norm_groups", "attention", "quant_conv")
LAYOUTS = ("LDM (SD 1.x/2.x, SDXL: encoder.down.N.block.M..., quant_conv; under first_stage_model. or bare)",
           "BFL (FLUX ae.safetensors: the LDM names without quant_conv)")
# The latent scale and shift of the release a file comes from (its diffusers config): what a diffusion model trained
# on its latents used. The aekl evaluation measures a trained model's own, and the export writes those.
FACTORS = {
    "sd": {"scaling_factor": 0.18215},  # SD 1.x/2.x, and a bare SDXL VAE file (its keys are SD's: no way to tell)
    "sdxl": {"scaling_factor": 0.13025},  # a whole SDXL checkpoint (it has `conditioner.` keys)
    "sd3": {"scaling_factor": 1.5305, "shift_factor": 0.0609},  # a whole SD3 checkpoint: no quant_conv, prefixed
    "flux": {"scaling_factor": 0.3611, "shift_factor": 0.1159},  # FLUX's ae.safetensors: no quant_conv, bare
}


@dataclass(frozen=True)
class Pretrained:
    """Weights `model.pretrained` names: `path` is the folder holding config.json or the .safetensors file, `config`
    the diffusers AutoencoderKL config they fit. `fixes`: the aekl section fields the weights determine."""

    given: str  # model.pretrained as the user wrote it (messages name it)
    noun: str  # "folder", "repo" or "file"
    path: Path
    config: dict
    prefix: str = ""  # single files: the key prefix of the VAE's tensors
    fixes: tuple[str, ...] = SECTION_FIELDS

    def section(self) -> dict:
        """The aekl section fields these weights determine (what `with_pretrained` fills in)."""
        c = self.config
        fields = {"channels": list(c["block_out_channels"]), "layers_per_block": c["layers_per_block"],
                  "latent_dim": c["latent_channels"], "norm_groups": c["norm_num_groups"],
                  "attention": c.get("mid_block_add_attention", True), "quant_conv": c.get("use_quant_conv", True)}
        return {k: fields[k] for k in self.fixes}

    def check(self, options: dict) -> None:
        """Refuse a model (AutoencoderKL keyword arguments, from the section and the data) these weights do not fit."""
        for key in ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
                    "norm_num_groups", "mid_block_add_attention", "use_quant_conv"):
            want, have = options[key], self.config.get(key, True)  # the two booleans default to True in diffusers
            if (list(want) if isinstance(want, tuple) else want) != have:
                raise ValueError(f"model.pretrained {self.given!r} has {key}={have}, the model section or data asks "
                                 f"for {want}: leave model.channels/layers_per_block/latent_dim/norm_groups/attention/"
                                 "quant_conv unset to take its values, and ingest images with its channel count")

    def load(self) -> nn.Module:
        """The AutoencoderKL in eval mode, float32 (the trainer's master weights): with no dtype given, diffusers
        casts a half-precision file's tensors to the float32 model it builds."""
        from diffusers import AutoencoderKL  # heavy (~2 s): only where a model is built

        if self.noun != "file":
            return AutoencoderKL.from_pretrained(self.path, use_safetensors=True)
        with safe_open(self.path, framework="pt") as f:  # only the VAE's tensors of a whole checkpoint
            tensors = {k[len(self.prefix):]: f.get_tensor(k) for k in f.keys()
                       if k.startswith(self.prefix) and k[len(self.prefix):].startswith(VAE_MODULES)}
        with tempfile.TemporaryDirectory() as folder:  # `config=` takes a folder or a repo id, and a folder stays here
            (Path(folder) / "config.json").write_text(json.dumps(self.config))
            vae = AutoencoderKL.from_single_file(tensors, config=folder, local_files_only=True)
        # diffusers leaves a weight it finds no tensor for uninitialised (meta) and only warns about unused ones
        state = vae.state_dict()
        empty = [k for k, v in state.items() if v.is_meta]
        if empty or len(state) != len(tensors):
            raise ValueError(f"model.pretrained {self.given!r}: {len(tensors)} VAE tensors converted to "
                             f"{len(state) - len(empty)} of the AutoencoderKL's {len(state)} weights (missing: "
                             f"{', '.join(empty[:3]) or 'none'}): not a layout diffusers converts; known layouts: "
                             f"{'; '.join(LAYOUTS)}")
        return vae


def locate(pretrained: str, subfolder: str | None = None, norm_groups: int = 32) -> Pretrained:
    """`model.pretrained` (+ `model.pretrained_subfolder`) as weights on this machine, or a ValueError of one line
    saying why not and what to do. A local path wins over a repo id spelled the same. `norm_groups`: the GroupNorm
    groups of a single file's model (no tensor says)."""
    refuse_pickle(pretrained)
    path = Path(pretrained).expanduser()
    if path.is_dir():
        return _folder(pretrained, "folder", path, subfolder)
    if path.suffix.lower() == ".safetensors" and not path.is_file():
        raise ValueError(f"model.pretrained {pretrained!r}: no such file")
    if path.is_file():
        if subfolder:
            raise ValueError(f"model.pretrained {pretrained!r} is a single file: it has no subfolder "
                             f"{subfolder!r}; leave model.pretrained_subfolder unset")
        return single_file(pretrained, path, norm_groups)
    return _folder(pretrained, "repo", cached_repo(pretrained, subfolder), subfolder)


def cached_repo(repo: str, subfolder: str | None) -> Path:
    """The snapshot folder of Hugging Face model repo `repo` (main) in the local cache; never goes to the network."""
    from huggingface_hub import constants, snapshot_download  # heavy-ish: only when a repo id is given
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise ValueError(f"model.pretrained {repo!r} is neither a local folder, a file, nor a Hugging Face repo id "
                         "(namespace/name): give a diffusers folder, a .safetensors file or a repo id") from None
    inside = f"{subfolder.strip('/')}/" if subfolder else ""
    try:  # only what gets loaded must be complete (a pipeline repo is often cached in part)
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=[
            f"{inside}config.json", f"{inside}diffusion_pytorch_model*.safetensors*"]))
    except LocalEntryNotFoundError:  # not cached, or (IncompleteSnapshotError) cached without what is loaded
        include, held = (f" --include '{inside}*'", f" with its {inside}") if inside else ("", "")
        raise ValueError(f"model.pretrained {repo!r} is no local folder or file, and the local Hugging Face cache "
                         f"({constants.HF_HUB_CACHE}) does not hold repo {repo!r}{held}; nothing is downloaded at "
                         f"run time: run `hf download {repo}{include}` (`huggingface-cli download {repo}{include}` "
                         "with huggingface_hub < 1.0) first") from None


def _folder(given: str, noun: str, root: Path, subfolder: str | None) -> Pretrained:
    folder = root / subfolder if subfolder else root
    where = f"{given!r}" + (f" (cached at {root})" if noun == "repo" else "")
    if not folder.is_dir():
        has = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise ValueError(f"model.pretrained_subfolder {subfolder!r} does not exist in {where}: its folders are "
                         f"{', '.join(has) or 'none'}")
    return Pretrained(given, noun, folder, folder_config(folder, where))


def folder_config(folder: Path, where: str) -> dict:
    """config.json of a diffusers AutoencoderKL folder; a wrong folder raises naming what is missing."""
    config = folder / "config.json"
    if not config.is_file():
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = (f"; for a single file give its path, e.g. {str(folder / files[0])!r}" if files else
                "; for a pipeline give model.pretrained_subfolder vae")
        raise ValueError(f"model.pretrained {where} is not a diffusers AutoencoderKL folder: no config.json in "
                         f"{folder}{hint}")
    data = json.loads(config.read_text())
    if data.get("_class_name") not in (None, "AutoencoderKL"):
        raise ValueError(f"model.pretrained {where} holds a {data['_class_name']}, not an AutoencoderKL")
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")):
        raise ValueError(f"model.pretrained {where} has no diffusion_pytorch_model.safetensors in {folder} (weights "
                         "in .bin files are pickles and are not loaded: convert them to safetensors)")
    _describable(data, where)
    return data


def _describable(config: dict, where: str) -> None:
    """Refuse an AutoencoderKL the aekl section cannot rebuild (a checkpoint's model is rebuilt from the section)."""
    odd = [f"{k}={config[k]}" for k, ok in (("down_block_types", {"DownEncoderBlock2D"}),
                                             ("up_block_types", {"UpDecoderBlock2D"}), ("act_fn", {"silu"}))
           if k in config and not set([config[k]] if isinstance(config[k], str) else config[k]) <= ok]
    if config.get("use_quant_conv", True) != config.get("use_post_quant_conv", True):
        odd.append("use_quant_conv != use_post_quant_conv")
    if odd:
        raise ValueError(f"model.pretrained {where} is an AutoencoderKL model.arch aekl does not describe: "
                         f"{', '.join(odd)}")


def single_file(given: str, path: Path, norm_groups: int) -> Pretrained:
    """A .safetensors file in an original layout: its architecture read from the shapes in its header."""
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"model.pretrained {given!r} is a file but not .safetensors: give a .safetensors file "
                         f"({'; '.join(LAYOUTS)}) or a diffusers folder")
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as err:
        raise ValueError(f"model.pretrained {given!r} is not a readable safetensors file: {err}") from None
    prefix = next((p for p in VAE_PREFIXES if f"{p}encoder.conv_in.weight" in shapes
                   and f"{p}decoder.conv_out.weight" in shapes and f"{p}encoder.down.0.block.0.conv1.weight" in shapes),
                  None)
    if prefix is None:
        raise ValueError(f"model.pretrained {given!r}: the layout of this file is not recognised (no "
                         "encoder.conv_in / encoder.down.0.block.0 / decoder.conv_out, bare or under "
                         f"first_stage_model. or vae.); known layouts: {'; '.join(LAYOUTS)}")
    vae = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    levels = next(i for i in range(len(vae)) if f"encoder.down.{i}.block.0.conv1.weight" not in vae)
    quant = "quant_conv.weight" in vae
    if quant != ("post_quant_conv.weight" in vae):
        raise ValueError(f"model.pretrained {given!r} has only one of quant_conv and post_quant_conv: model.arch "
                         "aekl takes both or neither")
    if quant:
        release = "sdxl" if any(k.startswith("conditioner.") for k in shapes) else "sd"
    else:
        release = {"": "flux", "first_stage_model.": "sd3"}.get(prefix, "")
    config = {
        "_class_name": "AutoencoderKL", "act_fn": "silu",
        "in_channels": vae["encoder.conv_in.weight"][1], "out_channels": vae["decoder.conv_out.weight"][0],
        "block_out_channels": [vae[f"encoder.down.{i}.block.0.conv2.weight"][0] for i in range(levels)],
        "layers_per_block": next(j for j in range(len(vae)) if f"encoder.down.0.block.{j}.conv1.weight" not in vae),
        "latent_channels": vae["encoder.conv_out.weight"][0] // 2,  # the encoder emits mean and log-variance
        "norm_num_groups": norm_groups, "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in vae,
        "use_quant_conv": quant, "use_post_quant_conv": quant,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        **FACTORS.get(release, {}),
    }
    fixes = tuple(k for k in SECTION_FIELDS if k != "norm_groups")
    return Pretrained(given, "file", path, config, prefix, fixes)
