"""Where ftdeploy keeps what outlives a run: the user's cache (`$FTDEPLOY_CACHE`, else ~/.cache/ftdeploy).

It holds the dequantized base models (base-models/), the base GGUFs that adapter deploys share (base-gguf/),
the pinned Ollama build (ollama/<version>/), the local server's models, log and state file, and the wheelhouse
scripts/setup.sh fills.
"""

from __future__ import annotations

import os
from pathlib import Path


def state_dir() -> Path:
    return Path(os.environ.get("FTDEPLOY_CACHE", Path.home() / ".cache" / "ftdeploy"))
