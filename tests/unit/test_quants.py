"""The one table of quant types, checked against the quantizer it names."""

import pytest

from ftdeploy import quants


def test_every_type_is_one_the_pinned_llama_cpp_can_make():
    llama_cpp = pytest.importorskip("llama_cpp")  # the [train] extra; .ci/run installs it
    missing = [q.name for q in quants.TABLE if not isinstance(getattr(llama_cpp, q.ftype, None), int)]
    assert missing == []
    assert len({getattr(llama_cpp, q.ftype) for q in quants.TABLE}) == len(quants.TABLE), "two names, one ftype"


def test_the_table_runs_from_the_smallest_file_to_the_largest_along_the_ladder():
    bits = [quants.BY_NAME[name].bits for name in quants.LADDER]
    assert bits[0] < 4 and bits[-1] == 32
    assert quants.LADDER.index("q4_k_m") < quants.LADDER.index("q5_k_m") < quants.LADDER.index("q8_0")


def test_the_disk_estimate_uses_the_table_and_a_default_for_the_unknown():
    assert quants.bits_per_weight("q4_k_m") == 4.9
    assert quants.bits_per_weight("f16") == 16
    assert quants.bits_per_weight("nonsense", default=7.0) == 7.0
