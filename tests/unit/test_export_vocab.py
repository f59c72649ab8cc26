"""The converter sees which tokens of a SentencePiece model are special, whichever transformers saved the tokenizer."""

import json

from ftdeploy.stages.export import _with_added_tokens_decoder

ADDED = [{"id": 4, "content": "<start_of_turn>", "special": True, "normalized": False, "lstrip": False,
          "rstrip": False, "single_word": False}]


def _merged(folder, tokenizer_model=True, config=None):
    folder.mkdir()
    if tokenizer_model:
        (folder / "tokenizer.model").write_bytes(b"sentencepiece")
    (folder / "tokenizer.json").write_text(json.dumps({"added_tokens": ADDED}))
    (folder / "tokenizer_config.json").write_text(json.dumps(config or {"tokenizer_class": "GemmaTokenizer"}))
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_a_sentencepiece_tokenizer_saved_by_transformers_5_gets_its_added_tokens_listed(tmp_path):
    merged = _merged(tmp_path / "merged")
    view = _with_added_tokens_decoder(merged, tmp_path / "scratch" / "merged")
    assert view != merged and view.name == merged.name  # the converter names the model after its folder
    config = json.loads((view / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "GemmaTokenizer"
    assert config["added_tokens_decoder"]["4"]["content"] == "<start_of_turn>"
    assert config["added_tokens_decoder"]["4"]["special"] is True
    assert (view / "model.safetensors").read_bytes() == b"weights"
    assert "added_tokens_decoder" not in json.loads((merged / "tokenizer_config.json").read_text())  # untouched


def test_a_bpe_tokenizer_or_one_already_listed_is_converted_as_it_is(tmp_path):
    bpe = _merged(tmp_path / "bpe", tokenizer_model=False)
    assert _with_added_tokens_decoder(bpe, tmp_path / "v1" / "bpe") == bpe
    listed = _merged(tmp_path / "listed", config={"added_tokens_decoder": {"4": ADDED[0]}})
    assert _with_added_tokens_decoder(listed, tmp_path / "v2" / "listed") == listed
