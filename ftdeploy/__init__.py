"""ftdeploy: fine-tune a model on your data and serve it in Ollama.

The Python API (ftdeploy.api) is here too, loaded on first use so that `import ftdeploy` and `ftdeploy --help` stay
instant (no pydantic, no torch until a name is used):

    from ftdeploy import train_and_serve, Config
    served = train_and_serve(overrides={"train.max_steps": 20})

Each stage is its own function: ftdeploy.api.data (`ftdeploy.data` is the data library), and train, merge, export,
modelfile, register and verify here or in ftdeploy.api.
"""

from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ below loads them on first use
    from .api import Served, export, load_config, merge, modelfile, register, run_stage, train, train_and_serve, verify
    from .config_models import Config

__all__ = ["Config", "Served", "__version__", "export", "load_config", "merge", "modelfile", "register", "run_stage",
           "train", "train_and_serve", "verify"]
_API = frozenset(__all__) - {"Config", "__version__"}


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (PEP 562)."""
    if name == "Config":
        from .config_models import Config

        return Config
    if name in _API or name == "api":
        # Not `from . import api`: that first asks this package for `api`, which would come back here.
        from .api import Served  # noqa: F401 - loading the submodule makes it this package's `api`

        api = globals()["api"]
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
