"""The options of each architecture as a typed section: what its constructor takes, with a description per field.

Each model file declares its section beside its class (`ConvVAE.Options`), and `register_model` records both, so
the run config builds its `model` union from this registry (`SECTIONS`) instead of keeping a second list. This
module imports pydantic only: the config reads the sections without building a model.

Owns: the section base (`ArchOptions`) and the registry of sections. Imports nothing of the project.
"""

from __future__ import annotations

from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator

SECTIONS: dict[str, type[ArchOptions]] = {}  # model.arch -> its section, filled by vae.models.register_model


class ArchOptions(BaseModel):
    """Fields common to every architecture. A subclass holds exactly its constructor's options, so a field another
    architecture takes is refused instead of ignored, and the refusal names the architectures that take it."""

    # allow_inf_nan=False: an infinite width or std is refused ("Input should be a finite number")
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    name_prefix: ClassVar[str] = "vae"  # the default registered name is <prefix>-<source name>
    arch: str = Field(description="Architecture from vae.models (each subclass narrows it to its own name).")
    latent_dim: int = Field(2, gt=0, description="Size of z (2 gives the manifold plot).")

    @model_validator(mode="before")
    @classmethod
    def _own_fields_only(cls, data: Any) -> Any:
        """Name the architecture's fields, and which architectures take the stray one, not just 'extra input'."""
        if not isinstance(data, dict):
            return data
        arch = get_args(cls.model_fields["arch"].annotation)[0]
        stray = [name for name in data if name not in cls.model_fields]
        if stray:
            takers = {name: [a for a, section in SECTIONS.items() if name in section.model_fields] for name in stray}
            where = "; ".join(f"model.{name} is taken by {', '.join(takers[name]) or 'no architecture'}"
                              for name in stray)
            raise ValueError(f"model.arch {arch!r} takes only {', '.join(cls.model_fields)}: remove "
                             f"{', '.join('model.' + name for name in stray)} ({where})")
        return data

    def resolved(self) -> ArchOptions:
        """These options with whatever they leave to files filled in (aekl: a pretrained folder's architecture);
        called where the model is built, never during validation, which reads no disk. May raise ValueError."""
        return self

    def constructor_options(self) -> dict[str, Any]:
        """The keyword arguments of the architecture's constructor (everything but arch and latent_dim)."""
        return self.model_dump(exclude={"arch", "latent_dim"})


def add_section(name: str, section: type[ArchOptions]) -> None:
    """Record `section` as the options of architecture `name` (`register_model` calls this)."""
    declared = get_args(section.model_fields["arch"].annotation)
    if declared != (name,):
        raise ValueError(f"the options of model {name!r} must declare arch: Literal[{name!r}], got {declared}")
    SECTIONS[name] = section
