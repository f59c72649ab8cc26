"""A run directory as the stages before the modelfile stage leave it, without training: the data stage's stats.json,
a merged directory holding only the tokenizer files with the chat template, and an export record serving a GGUF (the
embedded SmolLM2-135M, or a copy of it). Enough for the modelfile and register stages, in no time."""

from __future__ import annotations

import json
from pathlib import Path

from ftdeploy.runs import Run


def served_run(runs_dir: Path, name: str, gguf: Path, stats: dict) -> Run:
    """Run `name` in `runs_dir` with export done (serving `gguf` as its q4_1) and `stats` as data/stats.json."""
    from ftdeploy.chat_template import read_gguf_chat_template

    run = Run(runs_dir / name)
    run.data_dir.mkdir(parents=True)
    (run.data_dir / "stats.json").write_text(json.dumps(stats))
    run.merged_dir.mkdir()
    chat = read_gguf_chat_template(gguf)
    (run.merged_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": chat.template, "bos_token": chat.bos, "eos_token": chat.eos}))
    run.update(stages={"export": {"status": "done", "fingerprint": "fp-export",
                                  "outputs": {"gguf": {"q4_1": str(gguf)}, "served": "q4_1"}}})
    return run
