"""`flaky`: a test source plugin, scikit-learn's digits read through a reader that fails once per group or waits
for a file, registered as an installed plugin would be (in the test process, and in a flow subprocess through
`run_gated_ingest`). Attempts are counted in files, since shard-group tasks run in worker threads."""

from __future__ import annotations

import time
from collections.abc import Iterator
from importlib.metadata import EntryPoint
from pathlib import Path

from pydantic import Field

from flows.ingest_dataset import ingest_dataset
from pipeline.records import Record
from pipeline.sources import available_sources
from pipeline.sources.digits import DigitsConfig, DigitsSource
from vae.config import IngestSection, SourceSection

WAIT_S = 300  # the longest a gated read waits for its file


class FlakyConfig(DigitsConfig):
    state_dir: str = Field(description="Where attempts are counted (one file per split and group start).")
    fail_first: bool = Field(True, description="The first read of each group fails half-way through.")
    wait_for: dict[str, str] = Field(default_factory=dict, description="Split -> a file each group read of that "
                                                                       "split blocks on until it exists.")


class FlakySource(DigitsSource):
    """scikit-learn's digits, read through a flaky, optionally gated reader."""

    name = "flaky"
    Config = FlakyConfig

    def records(self, split: str, start: int = 0, stop: int | None = None) -> Iterator[Record]:
        if stop is None:  # the plan peeking at the first image, not a group's read
            yield from super().records(split, start, stop)
            return
        state = Path(self.config.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        with open(state / f"attempts-{split}-{start}", "a") as f:  # appends are atomic for lines this short
            f.write("attempt\n")
        attempt = len((state / f"attempts-{split}-{start}").read_text().splitlines())
        gate = self.config.wait_for.get(split)
        if gate is not None:
            deadline = time.monotonic() + WAIT_S
            while not Path(gate).exists():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{gate} never appeared")
                time.sleep(0.2)
        for i, record in enumerate(super().records(split, start, stop)):
            if self.config.fail_first and attempt == 1 and i == (len(self._chosen(split)[start:stop]) // 2):
                raise OSError(f"transient read error in {split} at {start + i} (attempt {attempt})")
            yield record


def register_flaky_source() -> EntryPoint:
    """Add `flaky` to the (cached) source registry of this process, as an installed plugin would."""
    entry = EntryPoint(name="flaky", value=f"{__name__}:FlakySource", group="vaepipe.sources")
    available_sources()["flaky"] = entry
    return entry


def run_gated_ingest(options: dict, shard_dir: str, run_name: str) -> None:
    """Entry of a flow subprocess: register `flaky` and run the ingest flow against PREFECT_API_URL (two workers)."""
    register_flaky_source()
    out = ingest_dataset.with_options(flow_run_name=run_name)(
        SourceSection(name="flaky", options=options),
        IngestSection(shard_dir=shard_dir, samples_per_shard=512, block_size=128, workers=2),
    )
    print(f"ingested into {out}", flush=True)
