"""What the libraries print that a user cannot act on stays off the terminal (shown again with -vv): their
loggers, progress bars, advisory notes, and the deprecation warnings they raise about each other's internals
(e.g. PEFT reading transformers' deprecated `is_gradient_checkpointing` on every adapter load)."""

from __future__ import annotations

import logging
import os
import warnings

LIBRARIES = ("transformers", "datasets", "accelerate", "peft", "trl", "torch", "unsloth", "bitsandbytes", "httpx",
             "urllib3")


def quiet_libraries() -> None:
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    for key, value in (("TRANSFORMERS_VERBOSITY", "error"), ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                       ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    pattern = "|".join(LIBRARIES)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=rf"({pattern})(\.|$)")
