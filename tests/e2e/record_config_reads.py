"""`python record_config_reads.py ARGS…` runs `ftdeploy ARGS…` and writes, to $FTDEPLOY_CONFIG_READS, which config
keys each stage read while it ran ({stage: [dotted keys]}). The e2e test compares that with the stage registry's
declarations: a key a stage reads but its fingerprint leaves out is how a changed setting gets silently ignored
on a rerun (the verify.min_fidelity bug of issue 15)."""

import atexit
import contextlib
import json
import os

from pydantic import BaseModel

from ftdeploy.config import Config
from ftdeploy.runs import Run

reads: dict[str, set[str]] = {}
current: list[str] = []


def watch(cls: type[BaseModel], prefix: str) -> None:
    """Record every read of a leaf key of `cls` (and of its sections) while a stage is running."""
    fields = cls.model_fields
    sections = {name: f.annotation for name, f in fields.items()
                if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)}
    # Only keys, the model's fields: Config.origins (bookkeeping, not a setting) is no field.
    leaves = set(fields) - set(sections)
    original = cls.__getattribute__

    def getattribute(self, name):
        if current and name in leaves:
            reads.setdefault(current[-1], set()).add(prefix + name)
        return original(self, name)

    cls.__getattribute__ = getattribute
    for name, section in sections.items():
        watch(section, f"{prefix}{name}.")


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
