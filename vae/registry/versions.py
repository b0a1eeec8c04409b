"""Registered versions and their aliases: a new version of a model competes under its objective's `Criterion`.

The alias `champion` names the version with the best score under the model's criterion: for the ELBO family the
validation NLL (`val/nll_iwae` in nats, lower is better, tag `val_nll`), for aekl the validation PSNR (`val/psnr`
in dB, higher is better, tag `val_psnr`), read from each version's tag; the newest version holds the alias
`challenger`. `register_version` explains how the aliases stay right under concurrent runs.

Scores compare only under one evaluation protocol (vae/objectives/aekl/protocol.py; an aekl version carries its
digest in the tag `eval_protocol_sha256` and its fields in `eval_protocol`): the champion is the best of the versions
scored under the champion's protocol. A version scored under another protocol is registered and takes `challenger`,
but the champion stays, and its tag `protocol_not_compared` (and a warning) names the fields that differ. Versions
registered before protocols were recorded form a protocol of their own ("none recorded"): a champion from then is
never compared with a version that has a protocol, because its PSNR was measured another way (on floats, not
uint8); `vaepipe evaluate` scores both under one protocol, and the alias moves by hand.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from vae.objectives import CRITERIA, NLL, Criterion
from vae.objectives.aekl.protocol import DIGEST_TAG, PROTOCOL_TAG, differences

CHAMPION = "champion"
CHALLENGER = "challenger"
NOT_COMPARED_TAG = "protocol_not_compared"
ALIAS_ROUNDS = 20  # a round is two reads and any writes; two concurrent registrars settle in two or three


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    uri: str  # models:/<name>/<version>
    champion: bool  # whether this version holds the alias `champion` once the aliases have settled
    previous_champion_score: float | None  # the champion's score under the criterion before this registration
    not_compared: str | None = None  # why it was not compared with the champion (another evaluation protocol)


def _contest(client: mlflow.MlflowClient, name: str,
             criterion: Criterion = NLL) -> tuple[dict[str, int], dict[int, float], dict[int, dict[str, str]]]:
    """The model's aliases {alias: version}, its competing versions {version: score under `criterion`} and their
    tags; all empty when the model does not exist yet. Versions without the tag (registered by hand) do not
    compete."""
    try:
        aliases = {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}, {}, {}
        raise
    # One query for all versions (paged at 10,000, far beyond what a model accumulates).
    versions = client.search_model_versions(f"name='{name}'")
    scores = {int(v.version): float(v.tags[criterion.tag]) for v in versions if criterion.tag in v.tags}
    if CHAMPION in aliases and aliases[CHAMPION] not in scores:
        held = next(v for v in versions if int(v.version) == aliases[CHAMPION])
        other = [c for c in CRITERIA.values() if c.tag in held.tags and c != criterion]
        if other:  # e.g. an aekl run registering under the name of an ELBO model: the scores do not compare
            raise ValueError(
                f"{name}'s champion, version {aliases[CHAMPION]}, competes on {other[0].metric} (tag "
                f"{other[0].tag!r}), this model on {criterion.metric} (tag {criterion.tag!r}): the two cannot be "
                f"compared; register under another name (--tracking.model_name)")
        raise ValueError(
            f"{name} version {aliases[CHAMPION]} holds the alias {CHAMPION!r} but has no {criterion.tag!r} tag to "
            f"compare against; tag it (MlflowClient().set_model_version_tag({name!r}, '{aliases[CHAMPION]}', "
            f"{criterion.tag!r}, '<{criterion.metric}>')) or move the alias to a tagged version"
        )
    return aliases, scores, {int(v.version): v.tags for v in versions if criterion.tag in v.tags}


def _class(aliases: dict[str, int], scores: dict[int, float], tags: dict[int, dict[str, str]]) -> str | None:
    """The protocol digest versions compete under: the champion's, else the oldest competing version's (None:
    scored before protocols were recorded)."""
    held = aliases.get(CHAMPION, min(scores))
    return tags[held].get(DIGEST_TAG) if held in tags else None


def _not_compared(name: str, champion: int, theirs: dict[str, str], ours: dict[str, str]) -> str:
    """Why a version does not compete with champion `champion`: the protocol fields that differ."""
    if DIGEST_TAG not in theirs:
        return (f"{name}'s champion, version {champion}, was scored before evaluation protocols were recorded (its "
                "PSNR on floats, not uint8): the two are not compared and the champion stays; score both with "
                f"`vaepipe evaluate models:/{name}/{champion} <this version> --shards DIR` and move the alias by hand")
    if DIGEST_TAG not in ours:
        return (f"this version records no evaluation protocol, {name}'s champion (version {champion}) does: the "
                "two are not compared and the champion stays")
    fields = differences(json.loads(ours.get(PROTOCOL_TAG, "{}")), json.loads(theirs.get(PROTOCOL_TAG, "{}")))
    return (f"scored under another evaluation protocol than {name}'s champion, version {champion} (fields that "
            f"differ: {', '.join(fields)}): not compared, the champion stays")


def register_version(model_uri: str, name: str, score: float, run_id: str, tags: dict[str, str] | None = None,
                     nonfinite_reason: str | None = None, criterion: Criterion = NLL) -> RegisteredVersion:
    """Register `model_uri` as a new version of `name`, tagged with its `score` under `criterion` and `tags`.

    The new version takes the alias `challenger`; `champion` moves to it only if its score is strictly better,
    in the criterion's direction, than every other competing version's (a tie keeps the earlier version). The
    score goes under the criterion's tag: `val_nll` (nats, lower is better) by default, `val_psnr` (dB, higher is
    better) for aekl.

    A NaN or infinite `score` still registers the version (a trained model is never lost to a bad metric), but
    without the criterion's tag, so it does not compete and takes neither alias: it gets the tag
    `<criterion tag>_nonfinite` with `nonfinite_reason` (or the value) instead, and a warning says so.

    MLflow has no transaction over aliases, so a read-compare-set races: two registrars finishing together
    both read the old champion and the last writer wins, even when it is the worse one. Instead each
    registrar creates its version with its tags in one request, then loops: read every version and the
    aliases, compute the targets (champion: best score, then lowest version; challenger: the newest
    version), write the aliases that differ, and read again; it returns only after a read that agrees with
    its targets. Why that converges on the right answer: take the last alias write, W. Its registrar read
    again after W and found the aliases agreeing with the targets over every version in that read. A version
    it could not see was created later, so its own registrar read everything after W, found agreement too
    (it would otherwise have written after W), and saw a superset. Versions are only added, and the targets
    are a deterministic function of them, so the final aliases are the targets over all versions, whatever
    the interleaving. With no write at all, the aliases already agreed with every registrar's last read. The
    protocol versions compete under is the champion's (the oldest competing version's before there is one), and the
    champion only ever moves to a version of that protocol, so it stays one function of the versions too.
    """
    score = float(score)
    client = mlflow.MlflowClient()
    aliases, scores, _ = _contest(client, name, criterion)  # first: a champion without its tag fails before registering
    previous = scores.get(aliases[CHAMPION]) if CHAMPION in aliases else None
    if not math.isfinite(score):
        why = nonfinite_reason or f"{criterion.metric} is {score}"
        nonfinite_tag = f"{criterion.tag}_nonfinite"
        registered = mlflow.register_model(model_uri, name, tags={**(tags or {}), nonfinite_tag: why})
        warnings.warn(f"{name} version {registered.version} is registered without {criterion.tag!r} and takes no "
                      f"alias: {why}", stacklevel=2)
        client.set_tag(run_id, "registered_model_version", f"{name}/{registered.version}")
        client.set_tag(run_id, nonfinite_tag, why)
        return RegisteredVersion(name, int(registered.version), f"models:/{name}/{registered.version}", False,
                                 previous)
    # repr() round-trips a float exactly, so the next comparison sees the same number.
    registered = mlflow.register_model(model_uri, name, tags={**(tags or {}), criterion.tag: repr(score)})
    version = int(registered.version)
    for _ in range(ALIAS_ROUNDS):
        aliases, scores, tags_of = _contest(client, name, criterion)
        protocol = _class(aliases, scores, tags_of)  # only versions scored under one protocol compete
        best = criterion.best({v: s for v, s in scores.items() if tags_of[v].get(DIGEST_TAG) == protocol})
        targets = {CHAMPION: best, CHALLENGER: max(scores)}
        if all(aliases.get(alias) == v for alias, v in targets.items()):
            break
        for alias, v in targets.items():
            if aliases.get(alias) != v:
                client.set_registered_model_alias(name, alias, str(v))
    else:
        raise RuntimeError(f"the aliases of {name} did not settle in {ALIAS_ROUNDS} rounds: other registrations "
                           f"keep moving them; check them by hand (version {version} is registered)")
    client.set_tag(run_id, "registered_model_version", f"{name}/{version}")  # the run page names its version
    why = None
    if tags_of[version].get(DIGEST_TAG) != protocol:
        why = _not_compared(name, aliases[CHAMPION], tags_of[aliases[CHAMPION]], tags_of[version])
        client.set_model_version_tag(name, str(version), NOT_COMPARED_TAG, why)
        warnings.warn(f"{name} version {version}: {why}", stacklevel=2)
    return RegisteredVersion(name, version, f"models:/{name}/{version}", aliases[CHAMPION] == version, previous, why)


