"""The files ftdeploy ships besides its code, one folder each; `asset(folder, name)` is the path of one.

  demo/            the embedded demo: its config (demo.yaml), made-up facts (train.jsonl, eval.jsonl), tool-call
                   data (tools.jsonl, tools_eval.jsonl), arithmetic word problems for --method grpo
                   (arithmetic.jsonl, arithmetic_eval.jsonl: prompts and an `answer` column, which the example rewards
                   of ftdeploy/rewards.py score) and the general-knowledge prompts verify asks (general.jsonl)
  modelfiles/      an Ollama TEMPLATE per chat format (<ChatFormat.template_file>, templates.py)
  chat_templates/  ftdeploy's own chat templates, the names data.chat_template takes besides a file (<name>.jinja)
  strategies/      multi-process strategy configs: DeepSpeed ZeRO-3 (zero3.json, strategy.py)

The folders hold data, not modules: pyproject.toml's package-data ships them with the package, and they are read
from where the package is installed.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).parent


def asset(*parts: str) -> Path:
    """The path of a shipped file or folder: asset("demo", "demo.yaml"), asset("chat_templates")."""
    return ASSETS_DIR.joinpath(*parts)
