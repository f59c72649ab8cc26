"""Export keeps library progress bars off the terminal (issue 24, item 15): stamping the quant gate's scores into a
GGUF used to draw gguf-py's `Writing: 0%|...` bar on stderr."""

import numpy as np
import pytest


def _tiny_gguf(path):
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_stamping_metadata_draws_no_progress_bar_and_keeps_the_tensors(tmp_path, capfd):
    import gguf

    from ftdeploy.stages.export import stamp_metadata

    path = _tiny_gguf(tmp_path / "tiny.gguf")
    capfd.readouterr()
    stamp_metadata(path, {"ftdeploy.eval.top1_vs_f16": 0.91, "ftdeploy.eval.prompts": "train"})
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), f"stdout {out!r}, stderr {err!r}"
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["ftdeploy.eval.prompts"]
    assert bytes(field.parts[field.data[0]]).decode() == "train"
    assert reader.fields["ftdeploy.eval.top1_vs_f16"].parts[-1][0] == pytest.approx(0.91)
    assert np.array_equal(reader.tensors[0].data.reshape(8, 8), np.arange(64, dtype=np.float32).reshape(8, 8))
    # The library's own bar is put back: nothing here changes gguf-py for anyone else.
    from gguf.scripts import gguf_new_metadata
    from tqdm import tqdm

    assert gguf_new_metadata.tqdm is tqdm
