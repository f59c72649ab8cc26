"""`python record_config_reads.py ARGS…` runs `ftdeploy ARGS…` and writes, to $FTDEPLOY_CONFIG_READS, which config
keys each stage read while it ran ({stage: [dotted keys]}). The e2e test compares that with the stage registry's
declarations: a key a stage reads but its fingerprint leaves out is how a changed setting gets silently ignored
on a rerun (the verify.min_fidelity bug of issue 15)."""

import atexit
import contextlib
import dataclasses
import json
import os
import typing

from ftdeploy.config import Config
from ftdeploy.runs import Run

reads: dict[str, set[str]] = {}
current: list[str] = []


def watch(cls: type, prefix: str) -> None:
    """Record every read of a leaf key of `cls` (and of its sections) while a stage is running."""
    hints = typing.get_type_hints(cls)
    sections = {f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}
    # Only keys: a field the config builds itself (Config.origins, init=False) is bookkeeping, not a setting.
    leaves = {f.name for f in dataclasses.fields(cls) if f.init} - sections
    original = cls.__getattribute__

    def getattribute(self, name):
        if current and name in leaves:
            reads.setdefault(current[-1], set()).add(prefix + name)
        return original(self, name)

    cls.__getattribute__ = getattribute
    for name in sections:
        watch(hints[name], f"{prefix}{name}.")


watch(Config, "")
_stage = Run.stage


@contextlib.contextmanager
def recording_stage(self, name, fingerprint=None):
    with _stage(self, name, fingerprint) as out:
        current.append(name)
        try:
            yield out
        finally:
            current.pop()


Run.stage = recording_stage


@atexit.register
def _write() -> None:
    with open(os.environ["FTDEPLOY_CONFIG_READS"], "w") as fh:
        json.dump({stage: sorted(keys) for stage, keys in reads.items()}, fh, indent=1)


if __name__ == "__main__":
    from ftdeploy.cli import main

    main()
