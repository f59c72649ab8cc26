"""The Ollama settings from training: num_ctx from the context the model was trained for (rounded up to a multiple
of 256, at least data.max_seq_length, at most the base's context length), and the user's modelfile.parameters checked
against Ollama 0.17.4's parameter names and value types, a user's num_ctx winning over the trained one."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from served_run import served_run

from ftdeploy.base_model import embedded_gguf
from ftdeploy.config import ModelfileConfig, load_config
from ftdeploy.errors import ConfigError
from ftdeploy.modelfile_syntax import OLLAMA_PARAMETERS, ModelfileSyntaxError, parameter_value, parse
from ftdeploy.runs import Run
from ftdeploy.stages.modelfile import base_context_length, build_spec, trained_num_ctx
from ftdeploy.templates import match_chat_template

SMOL = embedded_gguf("smollm2-135m-instruct")  # llama.context_length 8192


# ---------------------------------------------------------------- the rounding rule


@pytest.mark.parametrize(("longest", "max_seq_length", "base_max", "num_ctx"), [
    (57, 2048, 8192, 4096),  # the demo: short rows, the default max_seq_length: Ollama's own smallest default
    (300, 5000, None, 5120),  # max_seq_length above it is the floor, rounded up to a multiple of 256
    (4097, 4096, None, 4352),  # a sequence past it (GRPO's prompt plus answer): the next multiple of 256, not 8192
    (1, 1, None, 4096),
    (6144, 6144, 8192, 6144),  # already a multiple: unchanged
    (5000, 4096, 4500, 4500),  # never above the base's context length, even where that is no multiple of 256
    (100, 2048, 512, 512),  # a base shorter than the floor (the tiny test models): the base's
])
def test_num_ctx_is_the_trained_context_rounded_up_to_256_within_the_base(longest, max_seq_length, base_max, num_ctx):
    assert trained_num_ctx(longest, max_seq_length, base_max) == num_ctx


def test_the_base_context_comes_from_the_gguf_and_else_from_the_merged_config(tmp_path):
    assert base_context_length(SMOL) == 8192
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGUX")
    assert base_context_length(not_gguf) is None
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 4096}))
    assert base_context_length(not_gguf, tmp_path) == 4096
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"max_position_embeddings": 131072}}))
    assert base_context_length(not_gguf, tmp_path) == 131072  # Gemma 3 and other multimodal configs nest it


# ---------------------------------------------------------------- names and value types


@pytest.mark.parametrize(("name", "given", "kept"), [
    ("num_ctx", 4096, 4096), ("num_ctx", "4096", 4096), ("num_ctx", 4096.0, 4096), ("seed", -1, -1),
    ("temperature", 0, 0.0), ("temperature", "0.7", 0.7), ("top_p", 0.9, 0.9), ("min_p", "5e-2", 0.05),
    ("use_mmap", False, False), ("use_mmap", "true", True), ("stop", "END", ["END"]), ("stop", ["a", "b"], ["a", "b"]),
])
def test_a_value_is_kept_as_the_go_type_ollama_holds_it_to(name, given, kept):
    value = parameter_value(name, given)
    assert value == kept and type(value) is type(kept)


@pytest.mark.parametrize(("name", "given", "message"), [
    ("num_ctx", 4096.5, "num_ctx takes an integer, got float 4096.5"),
    ("num_ctx", True, "num_ctx takes an integer, got bool True"),
    ("num_ctx", "1_000", "num_ctx takes an integer"),
    ("num_ctx", 1 << 63, "num_ctx takes an integer"),
    ("temperature", "warm", "temperature takes a number, got str 'warm'"),
    ("temperature", float("nan"), "temperature takes a number"),
    ("temperature", 1e39, "temperature takes a number"),  # beyond Go's float32
    ("use_mmap", 1, "use_mmap takes true or false"),
    ("stop", ["ok", 7], "stop takes a string or a list of strings"),
])
def test_a_value_of_another_type_is_refused_naming_the_type(name, given, message):
    with pytest.raises(ModelfileSyntaxError, match=re.escape(message)):
        parameter_value(name, given)


@pytest.mark.parametrize("given", [-5, 0, 3, "-1"])
def test_a_num_ctx_ollama_would_raise_to_4_tokens_is_refused(given):
    """Ollama 0.17.4 raises a num_ctx below 4 to 4 (server/sched.go): every prompt, the system prompt and the
    template's tokens included, is cut to 4 tokens and the model answers nonsense. A typo'd sign or a 0 meant as
    "the default" is refused where the config is read."""
    with pytest.raises(ModelfileSyntaxError, match=r"num_ctx is the context in tokens, got -?\d+: Ollama 0.17.4 "
                                                   r"serves 4 tokens for anything below 4"):
        parameter_value("num_ctx", given)
    assert parameter_value("num_ctx", 4) == 4
    with pytest.raises(ConfigError, match=r"modelfile.parameters.num_ctx: num_ctx is the context in tokens"):
        load_config(None, [f"modelfile.parameters={{num_ctx: {given}}}"])


def test_an_unknown_name_lists_the_valid_ones_and_the_closest():
    with pytest.raises(ModelfileSyntaxError) as exc:
        parameter_value("temprature", 0.5)
    text = str(exc.value)
    assert "'temprature' is not an Ollama parameter (did you mean temperature?)" in text
    assert "valid: frequency_penalty, main_gpu, min_p, num_batch, num_ctx" in text
    with pytest.raises(ModelfileSyntaxError, match="'context_length' is not an Ollama parameter; valid: "):
        parameter_value("context_length", 4096)
    with pytest.raises(ModelfileSyntaxError, match="'mirostat' is no longer an Ollama parameter"):
        parameter_value("mirostat", 1)


def test_the_config_names_the_key_and_keeps_the_values_as_their_types():
    with pytest.raises(ConfigError) as exc:
        load_config(None, ["modelfile.parameters={temprature: 0.5, num_ctx: big, top_k: 40}"])
    text = str(exc.value)
    assert "modelfile.parameters.temprature: 'temprature' is not an Ollama parameter (did you mean temperature?)" \
        in text
    assert "modelfile.parameters.num_ctx: num_ctx takes an integer, got str 'big'" in text
    assert "modelfile.parameters.top_k" not in text
    cfg = load_config(None, ['modelfile.parameters={num_ctx: "8192", temperature: 1, stop: "###"}'])
    assert cfg.modelfile.parameters == {"num_ctx": 8192, "temperature": 1.0, "stop": ["###"]}


def test_the_parameter_table_is_ollamas_own():
    """OLLAMA_PARAMETERS against api/types.go of the pinned Ollama (Options and Runner, by json tag and Go type), read
    from the Go module cache scripts/install-ollama.sh fills."""
    try:
        cache = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, timeout=60).stdout.strip()
    except OSError:
        cache = os.path.expanduser("~/go/pkg/mod")
    types_go = Path(cache or os.path.expanduser("~/go/pkg/mod")) / "github.com/ollama/ollama@v0.17.4/api/types.go"
    if not types_go.is_file():
        pytest.skip(f"no {types_go}: scripts/install-ollama.sh downloads the module")
    source = types_go.read_text()
    fields: dict[str, str] = {}
    for struct in ("Options", "Runner"):
        body = re.search(rf"^type {struct} struct {{\n(.*?)^}}", source, re.S | re.M)
        assert body, struct
        for go_type, tag in re.findall(r'^\s+\w+\s+(\S+)\s+`json:"(\w+)', body.group(1), re.M):
            fields[tag] = go_type
    go = {"int": int, "float32": float, "*bool": bool, "[]string": list}
    assert {name: go[t] for name, t in fields.items()} == OLLAMA_PARAMETERS


# ---------------------------------------------------------------- the Modelfile


def _mapping():
    from ftdeploy.chat_template import read_gguf_chat_template

    chat = read_gguf_chat_template(SMOL)
    return match_chat_template(chat.renderer(), chat.bos or None, source="smol", eos_token=chat.eos or None)


def test_the_users_num_ctx_wins_and_a_users_stop_adds_to_the_templates():
    mapping = _mapping()
    spec = build_spec(mapping, SMOL, ModelfileConfig(), None, {"temperature": 0.2}, num_ctx=2048)
    assert spec.parameters == {"temperature": 0.2, "num_ctx": 2048}
    assert ("num_ctx", "2048") in parse(spec.render())
    cfg = ModelfileConfig(parameters={"num_ctx": "8192", "temperature": 0.7, "stop": "###"})
    spec = build_spec(mapping, SMOL, cfg, None, {"temperature": 0.2}, num_ctx=2048)
    assert spec.parameters == {"temperature": 0.7, "num_ctx": 8192}
    assert spec.stops == [*mapping.format.stops, "###"]
    assert spec.ollama_parameters()["stop"] == spec.stops  # what /api/create is sent: the user's stop included
    commands = parse(spec.render())
    assert ("num_ctx", "8192") in commands and [v for k, v in commands if k == "stop"] == spec.stops


def test_the_modelfile_stage_serves_the_trained_context(tmp_path):
    from ftdeploy.pipeline import Context, run_stage

    runs = tmp_path / "runs"
    served_run(runs, "ctx", SMOL, {"max_length": 300, "max_seq_length": 5000, "rows": 4})
    cfg = load_config(None, [f"runs_dir={runs}", "name=ctx"])
    result = run_stage(Context(cfg, Run(runs / "ctx")), "modelfile")
    assert result.parameters["num_ctx"] == 5120
    assert result.context == ("num_ctx 5120: the trained context (longest trained sequence 300 tokens, "
                              "data.max_seq_length 5000, rounded up to a multiple of 256, at least Ollama's default "
                              "4096, at most the base's 8192)")
    assert ("num_ctx", "5120") in parse((runs / "ctx" / "Modelfile").read_text())

    grpo = served_run(runs, "grpo", SMOL, {"max_length": 100, "max_seq_length": 128, "method": "grpo"})
    cfg = load_config(None, [f"runs_dir={runs}", "name=grpo", "grpo.max_completion_length=8000"])
    assert run_stage(Context(cfg, grpo), "modelfile").parameters["num_ctx"] == 8192  # 8100 tokens; the base's 8192

    cfg = load_config(None, [f"runs_dir={runs}", "name=ctx", "modelfile.parameters={num_ctx: 4096}"])
    result = run_stage(Context(cfg, Run(runs / "ctx")), "modelfile")
    assert result.parameters["num_ctx"] == 4096
    assert result.context == "num_ctx 4096: modelfile.parameters.num_ctx (the trained context is 5120)"


def test_a_users_num_ctx_below_the_longest_trained_sequence_is_served_with_a_warning(tmp_path, caplog):
    from ftdeploy.pipeline import Context, run_stage

    runs = tmp_path / "runs"
    served_run(runs, "short", SMOL, {"max_length": 900, "max_seq_length": 2048, "rows": 4})
    for num_ctx, warned in ((512, True), (1024, False)):
        caplog.clear()
        cfg = load_config(None, [f"runs_dir={runs}", "name=short", f"modelfile.parameters={{num_ctx: {num_ctx}}}"])
        assert run_stage(Context(cfg, Run(runs / "short")), "modelfile").parameters["num_ctx"] == num_ctx
        assert (f"modelfile.parameters.num_ctx {num_ctx} is below the longest trained sequence (900 tokens)"
                in caplog.text) == warned
