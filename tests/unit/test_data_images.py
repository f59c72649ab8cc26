"""Image chats for a vision base (ftdeploy/data/images.py): every layout people write them in reads into the same
conversation, image parts in place and the images in order; what cannot train is a bad row named by file:line; a
text-only base refuses image rows as before."""

from __future__ import annotations

import base64
import io
import json

import pytest
from conftest import bad_row_reason, rows_read, write_rows

from ftdeploy.errors import DataError

Q, A = "What colour is this?", "Red."


def png(path, colour=(255, 0, 0), size=(8, 6)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def pics(tmp_path):
    (tmp_path / "img").mkdir()
    return {"red": png(tmp_path / "img" / "red.png"), "blue": png(tmp_path / "img" / "blue.png", (0, 0, 255), (4, 4))}


WANT = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]},
        {"role": "assistant", "content": A}]


@pytest.mark.parametrize("row", [
    # Hugging Face / TRL: bare image parts take the row's images in order
    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q}]},
                  {"role": "assistant", "content": [{"type": "text", "text": A}]}], "images": ["img/red.png"]},
    # ... or name their image themselves
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/red.png"}, {"type": "text", "text": Q}]},
                  {"role": "assistant", "content": A}]},
    # OpenAI image_url parts
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "img/red.png"}},
                                               {"type": "text", "text": Q}]},
                  {"role": "assistant", "content": A}]},
    # LLaMA-Factory: <image> placeholders with the row's images, sharegpt and messages alike
    {"conversations": [{"from": "human", "value": f"<image>{Q}"}, {"from": "gpt", "value": A}],
     "images": ["img/red.png"]},
    {"messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": A}],
     "images": ["img/red.png"]},
    {"instruction": f"<image>{Q}", "input": "", "output": A, "images": ["img/red.png"]},
], ids=["hf-row-images", "hf-inline", "openai-image_url", "llamafactory-sharegpt", "llamafactory-messages",
        "llamafactory-alpaca"])
def test_every_layout_reads_into_one_image_chat(tmp_path, pics, row):
    (rec,) = rows_read(tmp_path, [row], images=True)
    assert rec.messages == WANT
    assert [(im.data, im.width, im.height) for im in rec.images] == [(pics["red"], 8, 6)]


def test_images_in_order_with_text_rows_mixed_in(tmp_path, pics):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image"},
                                                       {"type": "text", "text": " and "}, {"type": "image"}]},
                          {"role": "assistant", "content": "Red, blue."}], "images": ["img/red.png", "img/blue.png"]}]
    text, pair = rows_read(tmp_path, rows, images=True)
    assert text.messages[0]["content"] == "Hi" and text.images == []
    assert pair.messages[0]["content"] == [{"type": "text", "text": "Compare "}, {"type": "image"},
                                           {"type": "text", "text": " and "}, {"type": "image"}]
    assert [im.data for im in pair.images] == [pics["red"], pics["blue"]]


def test_data_urls_and_absolute_paths(tmp_path, pics):
    url = "data:image/png;base64," + base64.b64encode(pics["blue"]).decode()
    row = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "image", "image": str(tmp_path / "img/red.png")},
        {"type": "text", "text": Q}]}, {"role": "assistant", "content": A}]}
    (rec,) = rows_read(tmp_path, [row], images=True)
    assert [im.data for im in rec.images] == [pics["blue"], pics["red"]]


def test_relative_paths_resolve_against_the_data_file(tmp_path, pics, monkeypatch):
    monkeypatch.chdir("/")
    (rec,) = rows_read(tmp_path, [{"messages": WANT[:1] + [{"role": "assistant", "content": A}],
                                   "images": ["img/red.png"]}], images=True)
    assert rec.images[0].source == str(tmp_path / "img" / "red.png")


GOOD = {"messages": WANT, "images": ["img/red.png"]}


@pytest.mark.parametrize(("row", "reason"), [
    ({**GOOD, "images": ["img/missing.png"]}, "image {tmp}/img/missing.png: No such file or directory"),
    ({**GOOD, "images": ["img/notes.txt"]}, "image {tmp}/img/notes.txt: not a readable image"),
    ({**GOOD, "images": ["img/red.png", "img/blue.png"]},
     "the row has 2 image(s) in 'images' but 1 place(s) for them"),
    ({"messages": [{"role": "user", "content": f"<image><image>{Q}"}, {"role": "assistant", "content": A}],
      "images": ["img/red.png"]}, "the row has 1 image(s) in 'images' but 2 place(s) for them"),
    ({"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}], "images": ["img/red.png"]},
     "the row has 1 image(s) in 'images' but 0 place(s) for them"),
    ({**GOOD, "images": "img/red.png"}, "'images' must be a list of image paths or URLs, got str"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                   {"role": "assistant", "content": A}]}, "messages[0] (user): content[0]: an 'image_url' part needs"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png,xx"}}]},
                   {"role": "assistant", "content": A}]}, "image data:image/png,xx...: a data: URL must be base64"),
], ids=["missing", "unreadable", "more-images", "more-placeholders", "no-place", "not-a-list", "no-url",
        "data-url-not-base64"])
def test_bad_image_rows_are_named(tmp_path, pics, row, reason):
    (tmp_path / "img" / "notes.txt").write_text("not an image")
    got = bad_row_reason(tmp_path, [GOOD, row], images=True)
    assert got.startswith(reason.format(tmp=tmp_path)), got


def test_raw_text_cannot_hold_images(tmp_path, pics):
    reason = bad_row_reason(tmp_path, [{"text": "plain"}, {"text": "<image> a caption", "images": ["img/red.png"]}],
                            images=True)
    assert reason.startswith("the row has images but its layout is raw text; images need a chat layout")


def test_a_text_only_base_still_refuses_image_rows(tmp_path, pics):
    path = write_rows(tmp_path / "d.jsonl", [GOOD])
    from ftdeploy.data import RecordStream

    with pytest.raises(DataError, match="d.jsonl:1: .*images not supported yet"):
        list(RecordStream(str(path)))


def test_videos_are_still_refused_with_a_vision_base(tmp_path, pics):
    assert "videos not supported yet" in bad_row_reason(tmp_path, [GOOD, {**GOOD, "videos": ["a.mp4"]}], images=True)


def test_an_image_row_survives_json_round_trip_of_its_parts(tmp_path, pics):
    (rec,) = rows_read(tmp_path, [GOOD], images=True)
    assert json.loads(json.dumps(rec.messages)) == WANT


def test_the_images_a_data_file_names_are_in_its_fingerprint(tmp_path, pics):
    """Editing, adding or restoring an image prepares the data again, as editing a row does; a file without images
    keeps the fingerprint it always had (its sha256)."""
    from ftdeploy.pipeline.artifacts import file_digest
    from ftdeploy.runs import sha256_file

    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "image": "img/red.png"},
                                                       {"type": "text", "text": Q}]},
                          {"role": "assistant", "content": A}]},
            {"messages": [{"role": "user", "content": f"<image>{Q}"}, {"role": "assistant", "content": A}],
             "images": [str(tmp_path / "img" / "blue.png")]},
            {"messages": [{"role": "user", "content": Q}, {"role": "assistant", "content": A}]}]
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    first = file_digest(str(data), "train")
    assert first != sha256_file(data)
    png(tmp_path / "img" / "blue.png", (0, 0, 254), (4, 4))  # one pixel value, same size and name
    edited = file_digest(str(data), "train")
    assert edited != first
    (tmp_path / "img" / "red.png").unlink()
    assert file_digest(str(data), "train") not in (first, edited)
    png(tmp_path / "img" / "red.png")
    assert file_digest(str(data), "train") == edited  # the content, not the file's time

    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps(rows[2]) + "\n")
    assert file_digest(str(text), "train") == sha256_file(text)
