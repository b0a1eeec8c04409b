"""The trainer's seams (vae/training/trainer.py, vae/objectives, vae/training/trained.py,
vae/training/finalize.py): an objective with a second model and optimiser (a critic, as an adversarial objective
has) trains, checkpoints and resumes exactly after a
SIGTERM; the model is rebuilt from the checkpoint's meta.json, not from the shard directory; imports point one way."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support.training import PRESET, checkpoint_tensors, in_process, train
from torch import nn

from vae.config import MODEL_SECTIONS, load_config
from vae.objectives import ARCH_OBJECTIVES, OBJECTIVES, Objective, build_objective, register_objective, unwrap
from vae.objectives.base import frozen
from vae.objectives.elbo.losses import elbo_terms
from vae.objectives.elbo.objective import ELBOObjective
from vae.tracking import metrics as metrics_module
from vae.tracking.metrics import METRICS
from vae.training import checkpoint
from vae.training.preemption import PREEMPTED_EXIT
from vae.training.trained import checkpoint_spec, load_trained, spec_of

CRITIC_START = 2  # the critic's loss starts at this optimiser step


class CriticObjective(Objective):
    """The ELBO plus a small critic on the reconstructions, trained by its own optimiser from CRITIC_START on:
    the shape of an adversarial objective (two models, two optimisers, a start step), with a critic tiny enough
    for a test. The generator's term goes through the critic's unwrapped module with its parameters frozen."""

    metrics = ("loss", "critic")

    def models(self, model: nn.Module) -> dict[str, nn.Module]:
        torch.manual_seed(1)
        critic = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))
        return {"model": model, "critic": critic}

    def lr_scale(self, name: str) -> float:
        return 0.5 if name == "critic" else 1.0

    def step(self, models, x, step, backward):
        out = models["model"](x)
        terms = elbo_terms(out, x, unwrap(models["model"]).head)
        x_rec = torch.sigmoid(out.params)
        loss = terms.loss
        critic = torch.zeros((), device=x.device)
        if step >= CRITIC_START:
            critic_module = getattr(models["critic"], "module", models["critic"])  # not through DDP's hooks
            with frozen(critic_module):
                loss = loss + 0.1 * nn.functional.softplus(-critic_module(x_rec)).mean()
        backward(loss)
        if step >= CRITIC_START:
            real, fake = models["critic"](x), models["critic"](x_rec.detach())
            critic = nn.functional.softplus(-real).mean() + nn.functional.softplus(fake).mean()
            backward(critic)
        return torch.stack((loss * len(x), critic.detach() * len(x))).detach()

    def validation_sums(self, model, batches, device):
        return ELBOObjective(self.cfg).validation_sums(model, batches, device)

    def validation_metrics(self, sums):
        return ELBOObjective(self.cfg).validation_metrics(sums)


@contextlib.contextmanager
def with_critic(tracking_uri: str, sigterm_at: int | None = None):
    """Train in this process (tests/support/training.py) with CriticObjective as the conv model's objective."""
    with in_process(tracking_uri, sigterm_at) as mp:
        mp.setitem(OBJECTIVES, "critic-test", CriticObjective)
        mp.setitem(ARCH_OBJECTIVES, "conv", "critic-test")
        # metric names are fixed (vae/tracking/metrics.py): an objective's own ones are added there
        mp.setattr(metrics_module, "METRICS", (*METRICS, "train/critic", "train/grad_norm_critic"))
        yield


def test_two_models_resume_exactly_after_sigterm(tmp_path, digits_shards, tracking_uri):
    with with_critic(tracking_uri):
        train(digits_shards, tmp_path / "whole", "--train.epochs", "2")
    with with_critic(tracking_uri, sigterm_at=CRITIC_START + 5), pytest.raises(SystemExit) as stopped:
        train(digits_shards, tmp_path / "cut", "--train.epochs", "2")  # in the second epoch, critic on
    assert stopped.value.code == PREEMPTED_EXIT
    cut = checkpoint.latest(tmp_path / "cut")
    assert checkpoint.read_meta(cut)["reason"] == "preempted"
    assert checkpoint.read_meta(cut)["global_step"] == CRITIC_START + 6  # the signalled step was finished
    with with_critic(tracking_uri):
        train(digits_shards, tmp_path / "cut", "--train.epochs", "2", "--train.resume", "true")

    whole, resumed = checkpoint.latest(tmp_path / "whole"), checkpoint.latest(tmp_path / "cut")
    assert whole.name == resumed.name == "step-000000010"
    files = {p.name for p in whole.iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin", "ema.safetensors",
            "ema_critic.safetensors"} <= files
    meta = checkpoint.read_meta(whole)
    assert meta["models"] == ["model", "critic"]
    assert meta["model_spec"]["arch"] == "conv" and meta["model_spec"]["image_shape"] == [1, 8, 8]
    expected, got = checkpoint_tensors(whole), checkpoint_tensors(resumed)
    assert expected.keys() == got.keys()
    assert any(k.startswith("optimizer_1.bin:") for k in expected)  # the critic's Adam moments are in there
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    # the critic trained (its loss started at CRITIC_START) and its EMA follows it
    critic = load_file(whole / "model_1.safetensors")
    torch.manual_seed(1)
    initial = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))
    assert not torch.equal(critic["0.weight"], initial[0].weight.detach())
    assert not torch.equal(load_file(whole / "ema_critic.safetensors")["0.weight"], critic["0.weight"])


def test_a_model_without_gradient_is_left_untouched_by_its_optimizer(tmp_path, digits_shards, tracking_uri):
    """Before CRITIC_START the critic gets no gradient: its weights and optimiser state stay as built."""
    with with_critic(tracking_uri, sigterm_at=CRITIC_START - 1), pytest.raises(SystemExit):
        train(digits_shards, tmp_path / "run", "--train.epochs", "1")
    path = checkpoint.latest(tmp_path / "run")
    torch.manual_seed(1)
    initial = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))
    for key, value in load_file(path / "model_1.safetensors").items():
        torch.testing.assert_close(value, initial.state_dict()[key], rtol=0, atol=0)
    assert torch.load(path / "optimizer_1.bin", weights_only=True)["state"] == {}


def test_fp16_with_two_models_is_refused_naming_bf16(tmp_path, digits_shards, tracking_uri):
    from vae.training.errors import TrainingError

    with with_critic(tracking_uri), pytest.raises(TrainingError, match="--train.mixed_precision bf16"):
        train(digits_shards, tmp_path / "run", "--train.mixed_precision", "fp16")


def test_the_model_is_rebuilt_from_meta_json_without_the_shard_directory(tmp_path, digits_shards, tracking_uri):
    """After training, loading the model reads the checkpoint only: the shards may be gone (or unreachable)."""
    import shutil

    shards = Path(shutil.copytree(digits_shards, tmp_path / "shards"))
    with in_process(tracking_uri):
        train(shards, tmp_path / "run", "--train.epochs", "1")
    shutil.rmtree(shards)
    model, meta = load_trained(tmp_path / "run")
    assert meta["model_spec"] == checkpoint.read_meta(checkpoint.latest(tmp_path / "run"))["model_spec"]
    weights = load_file(checkpoint.latest(tmp_path / "run") / "ema.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)


def test_a_checkpoint_without_a_stored_spec_is_upgraded_from_its_config(tmp_path, digits_shards):
    cfg = load_config(PRESET, ["--ingest.shard_dir", str(digits_shards)])
    assert checkpoint_spec({"config": cfg.model_dump(mode="json")}) == spec_of(cfg)


@pytest.mark.parametrize("arch", sorted(MODEL_SECTIONS))
def test_aekl_trains_on_its_own_objective_and_every_other_architecture_on_the_elbo(arch):
    cfg = load_config(PRESET, ["--model.arch", arch, "--loss.likelihood", "gaussian"])
    assert type(build_objective(cfg)).__name__ == ("AeklObjective" if arch == "aekl" else "ELBOObjective")


def test_objective_registry_fails_loudly(monkeypatch):
    with pytest.raises(ValueError, match="'elbo' is registered twice"):
        register_objective("elbo")(ELBOObjective)
    with pytest.raises(ValueError, match="model.arch 'aekl' already trains with objective 'aekl'"):
        register_objective("another", archs=("aekl",))(ELBOObjective)
    monkeypatch.setitem(ARCH_OBJECTIVES, "conv", "nope")
    with pytest.raises(ValueError, match="objective 'nope', which is not registered; registered: aekl, elbo"):
        build_objective(load_config(PRESET, []))


def test_an_s3_run_registers_and_loads_without_reaching_the_shards_again(s3_server, tmp_path,
                                                                         tracking_uri):
    """Shards in S3 behind an endpoint_url: training reads them with ingest.storage_options; what follows it (the
    model loaded, logged and registered) rebuilds from meta.json, so it works where the shards cannot be reached:
    a config without those options, or the endpoint gone (a sync from another machine, `python -m vae.tracking`)."""
    import mlflow
    import yaml

    import pipeline
    from vae.registry.publish import publish_run
    from vae.training import finalize

    url = "s3://shards/digits"
    pipeline.ingest("digits", {}, url, 512, 128, progress=False, storage_options={"endpoint_url": s3_server})
    out = tmp_path / "run"
    with in_process(tracking_uri):
        train(url, out, "--train.epochs", "1", "--ingest.storage_options.endpoint_url", s3_server,
              "--tracking.finalize", "evaluate")
    assert (out / finalize.DETAILS_FILE).is_file()  # the evaluation ran on the S3 validation split
    # The endpoint moves away: nothing after training may need it.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["ingest"]["storage_options"] = {"endpoint_url": "http://127.0.0.1:9"}
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    model, meta = load_trained(out)
    assert meta["model_spec"]["image_shape"] == [1, 8, 8]
    version = publish_run(out, meta["mlflow_run_id"], tracking_uri)
    registered = mlflow.MlflowClient(tracking_uri).get_model_version(version.name, str(version.version))
    assert registered.run_id == meta["mlflow_run_id"]


def test_registering_without_a_publisher_is_refused_before_training_and_journaling(tmp_path, digits_shards,
                                                                                  tracking_uri):
    """tracking.finalize register needs the registry's publisher, handed in by the entry point: without it the run
    stops before any step (not after training, with a registration that can never be sent)."""
    from vae.tracking.journal import MetricJournal
    from vae.training.errors import TrainingError
    from vae.training.trainer import train as bare_train

    cfg = load_config(PRESET, ["--ingest.shard_dir", str(digits_shards), "--train.output_dir", str(tmp_path / "run")])
    with in_process(tracking_uri), pytest.raises(TrainingError, match="needs a publisher to register the model"):
        bare_train(cfg)
    assert not (tmp_path / "run").exists()
    journal = MetricJournal(tmp_path / "j" / "run.jsonl", "0" * 32, tracking_uri)
    with pytest.raises(ValueError, match="opened without a publisher"):
        journal.publish(tmp_path / "run")
    assert journal.pending == []
