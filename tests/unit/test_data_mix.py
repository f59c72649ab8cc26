"""Mixing datasets (data.sources, data/mix.py): weights as each source's share of the mixed rows, max_rows as a cap
on a source's pool, a seeded and reproducible draw, eval rows per source, each source's bad rows named by its own
file and line, sources of different kinds refused naming both, every source in the data stage's fingerprint, and
the mix reported by the data stage, `ftdeploy data inspect` and the run report."""

import json
import random
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_tiny_model_dir, build_tiny_tokenizer, chat_mapping, write_rows

from ftdeploy.config import load_config
from ftdeploy.data import inspect_data, prepare_data
from ftdeploy.data.mix import plan_mix, row_counts
from ftdeploy.errors import ConfigError, DataError
from ftdeploy.pipeline import REGISTRY, Context, fingerprint
from ftdeploy.report import sections
from ftdeploy.runs import Run


def chats(n, tag="a"):
    return [{"messages": [{"role": "user", "content": f"q{tag}{i}"}, {"role": "assistant", "content": f"{tag}{i}"}]}
            for i in range(n)]


def alpaca(n, tag="b"):
    return [{"instruction": f"q{tag}{i}", "output": f"{tag}{i}"} for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _cfg(tmp_path, sources, *overrides):
    return load_config(None, [f"data.sources={json.dumps(sources)}", f"runs_dir={tmp_path / 'runs'}", *overrides])


def _prepare(tok, cfg, out, seed=0, method="sft"):
    stats = prepare_data(cfg.data, tok, chat_mapping(tok), out, seed, method)
    trained = [json.loads(line)["source"] for line in (out / "train.jsonl").read_text().splitlines()]
    return stats, trained


def _two_files(tmp_path, a=30, b=300):
    return (str(write_rows(tmp_path / "a.jsonl", chats(a))), str(write_rows(tmp_path / "b.jsonl", alpaca(b))))


# ---------------------------------------------------------------- the arithmetic of a mix


@pytest.mark.parametrize("pools,weights,oversample,counts", [
    ([30, 300], None, False, [30, 300]),  # no weights: every row
    ([30, 300], [1, 3], False, [30, 90]),  # the scarcer source sets the size; no row repeats
    ([30, 300], [1, 3], True, [100, 300]),  # oversample: the plentiful one sets it, the other repeats
    ([100, 1000], [3, 1], False, [100, 33]),
    ([10, 10, 10], [1, 1, 1], False, [10, 10, 10]),
    ([7, 100], [1, 2], False, [7, 14]),
    ([5, 5], [1, 2], False, [3, 5]),  # 2.5 : 5 -> whole rows (largest remainders), never past a pool
    ([0, 10], [1, 1], False, [0, 0]),
])
def test_plan_mix_follows_the_weights_in_whole_rows(pools, weights, oversample, counts):
    assert plan_mix(pools, weights, oversample) == counts


def test_row_counts_draw_from_the_pool_and_repeat_each_row_as_evenly_as_the_count_allows():
    held = {0, 1}
    capped = row_counts(20, held, 5, 5, random.Random(0))
    assert sum(capped) == 5 and set(capped) == {0, 1} and not capped[0] and not capped[1]
    repeated = row_counts(10, set(), 10, 34, random.Random(0))
    assert sum(repeated) == 34 and Counter(repeated) == {3: 6, 4: 4}
    assert list(row_counts(10, set(), 10, 34, random.Random(0))) == list(repeated)  # fixed by the seed


# ---------------------------------------------------------------- the data stage


def test_a_weighted_mix_of_a_chat_file_and_an_alpaca_file(tmp_path, tok):
    a, b = _two_files(tmp_path)
    cfg = _cfg(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 3}])
    stats, trained = _prepare(tok, cfg, tmp_path / "out")
    assert stats.layout == "messages+alpaca"
    # b (300 rows) holds out 5% for eval as one dataset would; a (< 200 rows) trains every row
    by_source = {s["path"]: s for s in stats.sources}
    assert (by_source[a]["rows"], by_source[a]["eval_rows"], by_source[a]["kept"]) == (30, 0, 30)
    assert (by_source[b]["rows"], by_source[b]["eval_rows"], by_source[b]["kept"]) == (300, 15, 90)
    assert (by_source[a]["share"], by_source[b]["share"]) == (0.25, 0.75)
    assert stats.rows == 120 and stats.eval_rows == 15
    assert Counter(s.split(":")[0] for s in trained) == {a: 30, b: 90}
    assert len(set(trained)) == 120  # no row twice
    assert trained[:8] != sorted(trained[:8], key=lambda s: s.split(":")[0])  # interleaved, not one then the other
    written = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert written["sources"] == stats.sources and written["train_source"] == "data.sources"
    eval_rows = [json.loads(line)["source"] for line in (tmp_path / "out" / "eval.jsonl").read_text().splitlines()]
    assert len(eval_rows) == 15 and all(s.startswith(b) for s in eval_rows) and not set(eval_rows) & set(trained)


def test_the_mix_is_fixed_by_the_seed(tmp_path, tok):
    a, b = _two_files(tmp_path)
    cfg = _cfg(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 3}])
    _, first = _prepare(tok, cfg, tmp_path / "one", seed=7)
    _, again = _prepare(tok, cfg, tmp_path / "two", seed=7)
    _, other = _prepare(tok, cfg, tmp_path / "three", seed=8)
    assert first == again
    assert first != other and Counter(s.split(":")[0] for s in other) == Counter(s.split(":")[0] for s in first)


def test_max_rows_caps_a_source_and_oversample_repeats_the_scarce_one(tmp_path, tok):
    a, b = _two_files(tmp_path, a=10, b=100)
    capped, trained = _prepare(tok, _cfg(tmp_path, [a, {"path": b, "max_rows": 25}]), tmp_path / "cap")
    assert [s["kept"] for s in capped.sources] == [10, 25] and capped.sources[1]["max_rows"] == 25
    assert len(set(trained)) == 35
    over, trained = _prepare(tok, _cfg(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 1}],
                                       "data.oversample=true"), tmp_path / "over")
    assert [s["kept"] for s in over.sources] == [100, 100]
    assert set(Counter(s for s in trained if s.startswith(a)).values()) == {10}  # each of a's 10 rows 10 times
    assert len({s for s in trained if s.startswith(b)}) == 100


def test_each_sources_bad_rows_are_named_by_its_own_file_and_line(tmp_path, tok):
    a = write_rows(tmp_path / "a.jsonl", [*chats(3), "{not json", *chats(2, "c")])
    b = write_rows(tmp_path / "b.jsonl", [*alpaca(4), {"instruction": "no output"}])
    cfg = _cfg(tmp_path, [str(a), str(b)], "data.on_bad_row=skip")
    stats, _ = _prepare(tok, cfg, tmp_path / "out")
    assert [s["bad_rows"] for s in stats.sources] == [1, 1] and stats.rows == 9
    assert stats.bad_rows[0].startswith(f"{a}:4: not JSON") and stats.bad_rows[1].startswith(f"{b}:5: ")
    with pytest.raises(DataError, match=rf"{b}: 1 bad row \(alpaca layout.*\n  {b}:5: "):
        _prepare(tok, _cfg(tmp_path, [str(write_rows(tmp_path / "good.jsonl", chats(3))), str(b)]), tmp_path / "e")


def test_sources_of_different_kinds_are_one_error_naming_both(tmp_path, tok):
    sft = str(write_rows(tmp_path / "chats.jsonl", chats(4)))
    pairs = str(write_rows(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"}
                                                      for i in range(4)]))
    for method in ("sft", "dpo"):
        with pytest.raises(DataError) as err:
            _prepare(tok, _cfg(tmp_path, [sft, pairs]), tmp_path / method, method=method)
        message = str(err.value)
        assert message.startswith("data.sources: ") and sft in message and pairs in message, message
        assert "supervised rows" in message and "preference pairs" in message and f"--method {method}" in message
    # two sources of pairs mix for dpo
    more = str(write_rows(tmp_path / "more.jsonl", [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"}
                                                    for i in range(3)]))
    stats, _ = _prepare(tok, _cfg(tmp_path, [pairs, more]), tmp_path / "dpo-ok", method="dpo")
    assert stats.rows == 7 and [s["kept"] for s in stats.sources] == [4, 3]


def test_eval_rows_come_from_each_sources_eval_path_or_data_eval(tmp_path, tok):
    a, b = _two_files(tmp_path)
    a_eval = str(write_rows(tmp_path / "a_eval.jsonl", chats(3, "e")))
    cfg = _cfg(tmp_path, [{"path": a, "eval_path": a_eval}, b], "data.eval_split=0.1")
    stats, _ = _prepare(tok, cfg, tmp_path / "own")
    assert [s["eval_rows"] for s in stats.sources] == [3, 30] and stats.eval_rows == 33
    assert [s["kept"] for s in stats.sources] == [30, 270]
    shared = str(write_rows(tmp_path / "shared_eval.jsonl", chats(2, "s")))
    stats, _ = _prepare(tok, _cfg(tmp_path, [a, b], f"data.eval={shared}", "data.eval_split=0.1"), tmp_path / "all")
    assert stats.eval_rows == 2 and [s["kept"] for s in stats.sources] == [30, 300]  # data.eval: nothing held out
    with pytest.raises(DataError, match=r"two.jsonl: no rows left for the mix after holding out 2 for eval"):
        _prepare(tok, _cfg(tmp_path, [str(write_rows(tmp_path / "two.jsonl", chats(2))), b], "data.eval_split=0.9"),
                 tmp_path / "none")


def test_config_errors_of_a_mix(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(None, ['data.sources=[a.jsonl, {path: b.jsonl, weight: 2}, {path: c.jsonl, weight: 0}, '
                           '{wieght: 1}]', "data.train=x.jsonl"])
    message = str(err.value)
    for expected in ("data.sources[2].weight: must be > 0, got 0.0", "data.sources[3].wieght: unknown key",
                     "data.sources[3].path: required"):
        assert expected in message
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.sources=[a.jsonl, {path: b.jsonl, weight: 2}]", "data.train=x.jsonl"])
    message = str(err.value)
    assert "data.sources and data.train (x.jsonl) are both set" in message
    assert "data.sources[0] (a.jsonl): no weight, while other sources have one; weigh every source or none" in message
    with pytest.raises(ConfigError, match="data.oversample: repeats rows to meet the sources' weights"):
        load_config(None, ["data.sources=[a.jsonl, b.jsonl]", "data.oversample=true"])
    assert load_config(None, ["data.sources=[a.jsonl]"]).data.sources[0].path == "a.jsonl"


def test_every_source_is_part_of_the_data_stages_fingerprint(tmp_path):
    a, b = _two_files(tmp_path, a=3, b=3)

    def data_fingerprint(*overrides, sources=None):
        cfg = _cfg(tmp_path, sources or [{"path": a, "weight": 1}, {"path": b, "weight": 2}], *overrides)
        return fingerprint(Context(cfg, Run(cfg.run_dir)), "data")

    before = data_fingerprint()
    assert data_fingerprint() == before
    assert data_fingerprint(sources=[{"path": a, "weight": 1}, {"path": b, "weight": 3}]) != before
    assert data_fingerprint(sources=[{"path": a, "weight": 1}, {"path": b, "weight": 2, "max_rows": 2}]) != before
    write_rows(Path(b), alpaca(3, "edited"))
    assert data_fingerprint() != before
    # the keys a mix added leave a run made before them as it was
    plain = load_config(None, [])
    assert not {"sources", "oversample", "revision"} & set(REGISTRY["data"].config_values(plain)["data"])


# ---------------------------------------------------------------- what is reported


def test_inspect_reports_the_mix_as_the_data_stage_draws_it(tmp_path, tok):
    a, b = _two_files(tmp_path)
    cfg = _cfg(tmp_path, [{"path": a, "weight": 1}, {"path": b, "weight": 3}])
    stats, _ = _prepare(tok, cfg, tmp_path / "out", seed=3)
    seen = inspect_data(cfg.data, None, tok, chat_mapping(tok), None, "sft", seed=3)
    assert seen.format == "messages+alpaca" and seen.rows == 120
    assert [s.model_dump() for s in seen.sources or []] == stats.sources
    assert "sources" not in inspect_data(cfg.data, a, tok, chat_mapping(tok), None).to_dict()  # one file: no mix


def test_the_run_report_has_a_data_mix_section():
    manifest = {"stages": {"data": {"status": "done", "outputs": {"rows": 120, "sources": [
        {"path": "a.jsonl", "layout": "messages", "rows": 30, "kept": 30, "share": 0.25, "weight": 1.0},
        {"path": "acme/b", "layout": "alpaca", "revision": "c" * 40, "rows": 300, "eval_rows": 15, "kept": 90,
         "share": 0.75, "weight": 3.0}]}}}}
    (title, text, rows), = [s for s in sections(manifest, "demo") if s[0] == "Data mix"]
    assert "120 training rows mixed from 2 sources" in text[0]
    assert rows[2] == ["acme/b @ cccccccccccc", "alpaca", "300", "0", "15", "90", "75%", "3"]


def test_the_report_says_which_source_max_rows_cut():
    """A source of 25 rows kept 10: the report says max_rows did it, as `ftdeploy data` does, not only the counts."""
    manifest = {"stages": {"data": {"status": "done", "outputs": {"rows": 30, "sources": [
        {"path": "a.json", "layout": "alpaca", "rows": 30, "kept": 20, "share": 0.67, "weight": 2.0},
        {"path": "b.jsonl", "layout": "sharegpt", "rows": 25, "kept": 10, "share": 0.33, "weight": 1.0,
         "max_rows": 10}]}}}}
    (_, _, rows), = [s for s in sections(manifest, "demo") if s[0] == "Data mix"]
    assert rows[1][5] == "20" and rows[2][5] == "10 (max_rows 10)"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")


def test_the_cli_data_stage_and_inspect_report_a_two_source_mix(tmp_path, tiny_base):
    from ftdeploy.cli import cli

    a, b = _two_files(tmp_path)
    config = tmp_path / "mix.yaml"
    config.write_text(f"base_model: {tiny_base}\nruns_dir: {tmp_path / 'runs'}\ndata:\n  sources:\n"
                      f"    - {{path: {a}, weight: 1}}\n    - {{path: {b}, weight: 3}}\n")
    result = CliRunner().invoke(cli, ["data", "--config", str(config)])
    assert result.exit_code == 0, result.output
    mix = result.output[result.output.index("mix:"):].splitlines()
    assert mix[0].split() == ["mix:", "source", "layout", "read", "bad", "eval", "kept", "share", "weight"]
    assert mix[1].split() == [a, "messages", "30", "0", "0", "30", "25.0%", "1"]
    assert mix[2].split() == [b, "alpaca", "300", "0", "15", "90", "75.0%", "3"]
    result = CliRunner().invoke(cli, ["data", "--config", str(config), "--json"])
    assert [s["kept"] for s in json.loads(result.output[result.output.index("{"):])["sources"]] == [30, 90]
    result = CliRunner().invoke(cli, ["data", "--config", str(config), "inspect", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["rows"] == 120 and [s["share"] for s in report["sources"]] == [0.25, 0.75]
    result = CliRunner().invoke(cli, ["data", "--config", str(config), "inspect"])
    assert result.exit_code == 0 and f"{b}  alpaca" in result.output.replace("  ", "  ")
