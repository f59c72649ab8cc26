"""Image chats: the layouts people write them in, read into conversations whose messages hold image parts, for a
vision base model (a text-only base refuses image rows in formats.py, as it always has).

  Hugging Face / TRL   content parts {"type": "text", "text"}, {"type": "image"} taking the row's "images" list in
                       order, or {"type": "image", "image": path-or-URL} (also "url" / "path")
  OpenAI               {"type": "image_url", "image_url": {"url": path, data: URL or http(s) URL}} ("input_image")
  LLaMA-Factory        "<image>" placeholders in the text (any chat layout: sharegpt, messages, alpaca, pairs) with the
                       row's "images" list, one image per placeholder, in order

An image is a file path (relative paths resolve against the data file's folder), a `data:image/...;base64,` URL, an
http(s) URL (fetched once), or, from a Hub dataset, a {"bytes": ...} dict or a PIL image. Every image is opened and
decoded here: a missing, unreadable or undecodable image, or a count of placeholders that does not match the row's
images, is a bad row named by file:line. Rows without images mix in as they are.

How: before a row is converted (formats.py), each image is taken out and replaced in the text by MARK, so every check
of the text layouts (roles, weights, tools, the system prompt) runs unchanged; after it, each message holding MARK
becomes a list of parts, [{"type": "image"}, {"type": "text", "text": ...}] as the vision chat templates take them,
and the record carries its images in order.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sources import BadRow

MARK = "\ue000image\ue000"  # stands for an image inside the text while a row is converted (private-use characters)
PLACEHOLDER = "<image>"
IMAGE_PARTS = ("image", "image_url", "input_image")
_LOCATION = re.compile(r"^(?P<path>.*?)(?::\d+|\[\d+\]|:row \d+)$")  # where sources.py says a row came from
URL_TIMEOUT = 30.0


@dataclass
class Image:
    """One image of a row: its bytes, where it came from, and its size."""

    data: bytes
    source: str
    width: int
    height: int

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def data_dir_of(where: str) -> Path | None:
    """The folder of the local data file a row came from (`where` as sources.py writes it), for relative paths."""
    m = _LOCATION.match(where)
    path = Path(m.group("path") if m else where)
    return path.parent if path.is_file() else None


def take_images(where: str, row: Any) -> tuple[Any, list[Any]] | BadRow:
    """The row with each image replaced by MARK in its text (image parts become text parts holding MARK, <image>
    placeholders become MARK, the row's "images" list is taken out), and the images' sources in the order their
    marks appear; or why the row's images do not add up."""
    if not isinstance(row, dict):
        return row, []
    listed = row.get("images")
    if listed is None or listed == []:
        listed = []
    elif not isinstance(listed, list):
        return BadRow(f"'images' must be a list of image paths or URLs, got {type(listed).__name__}")
    out = {k: v for k, v in row.items() if k != "images"}
    sources: list[Any] = []
    pending = list(listed)  # the row's images, for bare {"type": "image"} parts and <image> placeholders
    for key, value in row.items():
        if isinstance(value, list) and any(isinstance(m, dict) for m in value):
            converted = _mark_messages(key, value, pending, sources)
            if isinstance(converted, BadRow):
                return converted
            out[key] = converted
        elif isinstance(value, str) and PLACEHOLDER in value:
            out[key] = _mark_text(value, pending, sources)
    if pending or any(s is None for s in sources):
        wanted = sum(s is None for s in sources) + (len(listed) - len(pending))
        return BadRow(f"the row has {len(listed)} image(s) in 'images' but {wanted} place(s) for them "
                      f"({PLACEHOLDER} placeholders or {{\"type\": \"image\"}} parts): each image needs its place "
                      "in the text, in order")
    return out, sources


def _mark_text(text: str, pending: list[Any], sources: list[Any]) -> str:
    count = text.count(PLACEHOLDER)
    for _ in range(count):
        sources.append(pending.pop(0) if pending else None)  # None: a placeholder with no image
    return text.replace(PLACEHOLDER, MARK)


def _mark_messages(key: str, messages: list[Any], pending: list[Any], sources: list[Any]) -> list[Any] | BadRow:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            out.append(m)
            continue
        m = dict(m)
        for field in ("content", "value"):
            if isinstance(m.get(field), str) and PLACEHOLDER in m[field]:
                m[field] = _mark_text(m[field], pending, sources)
            elif isinstance(m.get(field), list):
                parts = []
                for k, part in enumerate(m[field]):
                    if isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
                        source = _part_source(part)
                        if isinstance(source, BadRow):
                            return BadRow(f"{key}[{i}] ({m.get('role', m.get('from'))}): content[{k}]: "
                                          f"{source.reason}")
                        sources.append(source if source is not None else (pending.pop(0) if pending else None))
                        parts.append({"type": "text", "text": MARK})
                    elif isinstance(part, dict) and part.get("type") == "text" and \
                            isinstance(text := part.get("text", part.get("value")), str) and PLACEHOLDER in text:
                        parts.append({"type": "text", "text": _mark_text(text, pending, sources)})
                    else:
                        parts.append(part)
                m[field] = parts
        out.append(m)
    return out


def _part_source(part: dict[str, Any]) -> Any:
    """The image an image part names itself (None: a bare {"type": "image"} takes the row's next image)."""
    if part["type"] in ("image_url", "input_image"):
        url = part.get("image_url")
        if isinstance(url, dict):
            url = url.get("url")
        if not isinstance(url, str) or not url:
            return BadRow(f"an {part['type']!r} part needs its URL: {{\"image_url\": {{\"url\": ...}}}}")
        return url
    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return part[key]
    return None


def with_image_parts(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each message whose text holds MARK as a list of parts: image parts where the marks were, text between."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str) and MARK in content:
            parts: list[dict[str, Any]] = []
            for k, piece in enumerate(content.split(MARK)):
                if k:
                    parts.append({"type": "image"})
                if piece:
                    parts.append({"type": "text", "text": piece})
            m = {**m, "content": parts}
        out.append(m)
    return out


def count_marks(messages: list[dict[str, Any]]) -> int:
    return sum(m["content"].count(MARK) for m in messages if isinstance(m.get("content"), str))


# ---------------------------------------------------------------- reading an image


def load_image(source: Any, base: Path | None) -> Image | str:
    """The image `source` names, read and decoded, or why it cannot be."""
    data = _image_bytes(source, base)
    if isinstance(data, str):
        return data
    raw, shown = data
    try:
        from PIL import Image as PILImage

        with PILImage.open(io.BytesIO(raw)) as im:
            im.load()
            width, height = im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a file it cannot decode
        return f"image {shown}: not a readable image ({type(exc).__name__}: {str(exc)[:120]})"
    return Image(raw, shown, width, height)


def _image_bytes(source: Any, base: Path | None) -> tuple[bytes, str] | str:
    if isinstance(source, dict) and isinstance(source.get("bytes"), bytes | bytearray):
        return bytes(source["bytes"]), str(source.get("path") or "<bytes>")
    if isinstance(source, dict) and isinstance(source.get("path"), str):
        source = source["path"]
    if hasattr(source, "save") and hasattr(source, "size"):  # a PIL image (a Hub dataset's decoded Image feature)
        buf = io.BytesIO()
        source.save(buf, format="PNG")
        return buf.getvalue(), "<PIL image>"
    if not isinstance(source, str) or not source.strip():
        return f"an image must be a path, a data: URL or an http(s) URL, got {type(source).__name__} {source!r}"[:160]
    if source.startswith("data:"):
        head, _, payload = source.partition(",")
        if ";base64" not in head:
            return f"image {source[:40]}...: a data: URL must be base64 (data:image/png;base64,...)"
        try:
            return base64.b64decode(payload, validate=True), f"{head},..."
        except (binascii.Error, ValueError):
            return f"image {head},...: not valid base64"
    if source.startswith(("http://", "https://")):
        return _fetch(source)
    path = Path(source).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    try:
        return path.read_bytes(), str(path)
    except OSError as exc:
        return f"image {path}: {exc.strerror or exc}"


def _fetch(url: str) -> tuple[bytes, str] | str:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT) as resp:  # noqa: S310 - the user's own image URL
            return resp.read(), url
    except Exception as exc:  # noqa: BLE001 - no connection, HTTP errors, timeouts: the row is bad either way
        return f"image {url}: could not be fetched ({type(exc).__name__}: {str(exc)[:120]})"


def image_record(where: str, row: Any, convert: Any) -> Any:
    """The row as its Record (formats.Record; `convert` converts a row with its images taken out) with its images
    read and its messages in parts, or the bad-row line naming where it came from."""
    taken = take_images(where, row)
    if isinstance(taken, BadRow):
        return f"{where}: {taken.reason}"
    marked, sources = taken
    result = convert(marked)
    if isinstance(result, str) or not sources:
        return result
    if result.messages is None:
        return f"{where}: the row has images but its layout is raw text; images need a chat layout (messages, " \
               "sharegpt, alpaca, pairs)"
    if (placed := count_marks(result.messages)) != len(sources):
        return f"{where}: {len(sources)} image(s), but {placed} of them in the text this layout trains (an image in " \
               "a field the layout does not read?)"
    base = data_dir_of(where)
    loaded = []
    for source in sources:
        image = load_image(source, base)
        if isinstance(image, str):
            return f"{where}: {image}"
        loaded.append(image)
    result.messages = with_image_parts(result.messages)
    result.images = loaded
    return result


# ---------------------------------------------------------------- the images a data file names, for its fingerprint


def local_image_digests(path: Path) -> list[str]:
    """`name sha256` of each local image file the rows of the data file `path` name (relative paths against its
    folder), each once, in order; `name missing` for one that is not there (yet): an edited, added or restored image
    prepares the data again, as an edited row does. Nothing for a file that names no image (no row is parsed unless
    the file mentions one). Rows that do not parse are left to the data stage, which names them."""
    if not _mentions_images(path):
        return []
    from ..errors import DataError
    from .sources import iter_rows

    seen: dict[Path, str] = {}
    try:
        for where, row in iter_rows(str(path)):
            taken = take_images(where, row)
            for source in [] if isinstance(taken, BadRow) else taken[1]:
                local = _local_path(source, path.parent)
                if local is not None and local not in seen:
                    seen[local] = _file_sha(local)
    except DataError:
        pass
    return [f"{p} {digest}" for p, digest in seen.items()]


def _mentions_images(path: Path) -> bool:
    needles = (b'"images"', b'"image"', b'"image_url"', b'"input_image"', PLACEHOLDER.encode())
    tail = b""
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            if any(n in tail + block for n in needles):
                return True
            tail = block[-16:]
    return False


def _local_path(source: Any, base: Path) -> Path | None:
    if isinstance(source, dict):
        source = source.get("path") if not isinstance(source.get("bytes"), bytes | bytearray) else None
    if not isinstance(source, str) or not source.strip() or source.startswith(("data:", "http://", "https://")):
        return None
    path = Path(source).expanduser()
    return path if path.is_absolute() else base / path


def _file_sha(path: Path) -> str:
    try:
        stat = path.stat()
    except OSError:
        return "missing"
    return _sha_of(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _sha_of(path: Path, size: int, mtime_ns: int) -> str:  # size and mtime: a changed file is hashed again
    del size, mtime_ns
    from ..runs import sha256_file

    try:
        return sha256_file(path)
    except OSError:
        return "unreadable"
