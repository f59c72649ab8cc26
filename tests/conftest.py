"""Shared fixtures: an isolated ftdeploy cache, a tiny chat tokenizer, a real Ollama server, and a scripted HTTP
server that fails the ways a real one can (silence, a stalled body, a dropped connection)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Materialised base models and the pinned ollama build are expensive: tests share the user's cache.
SHARED_CACHE = Path(os.environ.get("FTDEPLOY_CACHE", Path.home() / ".cache" / "ftdeploy"))


@pytest.fixture(autouse=True)
def _isolate_state(tmp_path_factory, monkeypatch):
    """No test talks to a user's Ollama or writes to the real runs/ directory by accident."""
    monkeypatch.delenv("OLLAMA_HOST", raising=False)
    monkeypatch.setenv("FTDEPLOY_CACHE", str(SHARED_CACHE))


CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass
class Dataset:
    records: list  # of ftdeploy.data.Record
    layout: str
    bad: list[str]


def read_dataset(spec, *args, **kw) -> Dataset:
    """A dataset read as the data stage reads it (one pass of a RecordStream, same arguments), kept whole for a test
    to look at; its errors raised as the pass raises them."""
    from ftdeploy.data import RecordStream

    stream = RecordStream(str(spec), *args, **kw)
    records = list(stream)
    return Dataset(records, stream.layout, stream.bad)


def write_rows(path: Path, rows) -> Path:
    """A JSONL file of these rows (a str row is written as it is: a broken line)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def rows_read(tmp_path: Path, rows, **kw):
    """The records the data stage reads from a JSONL file of these rows."""
    return read_dataset(str(write_rows(tmp_path / "d.jsonl", rows)), **kw).records


def bad_row_reason(tmp_path: Path, rows, **kw) -> str:
    """Why the last row is bad (the rows before it good): the text after `file:line: ` in the error."""
    from ftdeploy.errors import DataError

    path = write_rows(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as err:
        read_dataset(str(path), **kw)
    line = f"{path}:{len(rows)}: "
    found = [r.strip() for r in str(err.value).splitlines() if r.strip().startswith(line)]
    assert found, str(err.value)
    return found[0][len(line):]


def chat_mapping(tok):
    """The chat format a tokenizer's chat template matches."""
    from ftdeploy.templates import match_chat_template

    return match_chat_template(lambda m, g: tok.apply_chat_template(m, tokenize=False, add_generation_prompt=g),
                               tok.bos_token)


def build_tiny_tokenizer(chat_template: str = CHATML_TEMPLATE, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                         eos: str = "<|im_end|>", pad: str | None = None):
    """A real fast BPE tokenizer trained in milliseconds, with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = ["The Zephyr service uses port 7341.", "What port does the Zephyr service use?",
              "system user assistant You are a helpful assistant", "hello world"] * 20
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=specials[0], pad_token=pad)
    fast.chat_template = chat_template
    return fast


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


def build_tiny_model_dir(path: Path, **tokenizer_kw: object) -> Path:
    """A Llama-shaped model of about 40,000 parameters, random weights, saved with the tiny tokenizer (built with
    `tokenizer_kw`: build_tiny_tokenizer's eos, pad, ...): a local base model that the real training code loads and
    trains in seconds on CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(**tokenizer_kw)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


class RealOllama:
    """A real `ollama serve` (the pinned build) on a free loopback port with its own models folder.

    `client` is ftdeploy's; `official` is the `ollama` package's own client, as a user would make it, and `chat`
    asks through it: the served model's answers are checked with the client our users query it with."""

    def __init__(self, server, client):
        import ollama

        self.server, self.client, self.host = server, client, server.host
        self.official = ollama.Client(host=server.host, timeout=600)

    def show_json(self, model: str) -> dict:
        """The server's own /api/show answer, every field of it (the official client's ShowResponse has no
        `system`, for one)."""
        import httpx

        resp = httpx.post(f"{self.host}/api/show", json={"model": model}, timeout=60)
        resp.raise_for_status()
        return resp.json()

    def chat(self, model: str, prompt: str, **options) -> str:
        reply = self.official.chat(model=model, messages=[{"role": "user", "content": prompt}],
                                   options={"temperature": 0, "num_predict": 64, **options})
        return reply.message.content


@pytest.fixture(scope="session")
def ollama_server(tmp_path_factory):
    from ftdeploy.local_server import find_ollama_binary, free_port
    from ftdeploy.ollama import OllamaClient, start_local_server

    binary = find_ollama_binary()
    if binary is None:
        pytest.fail("no ollama binary: run scripts/setup.sh "
                    "(it builds the pinned release with scripts/install-ollama.sh)")
    root = tmp_path_factory.mktemp("ollama")
    server = start_local_server(port=free_port(), models_dir=root / "models", log_path=root / "serve.log",
                                binary=binary, detach=False)
    try:
        yield RealOllama(server, OllamaClient(server.host))
    finally:
        server.stop()


# A token in the environment (as in the container) must never reach output, logs, manifest or report.
E2E_SECRET = "hf_ftdeployE2eNeverWriteThisToken"
CONFIG_READS_RECORDER = REPO / "tests" / "e2e" / "record_config_reads.py"
E2E_RUN = "ftdeploy-e2e"


def cli_train_and_serve(runs, host, record_reads=None):
    """`ftdeploy train-and-serve` on the demo as run E2E_RUN; with `record_reads`, through a wrapper that writes which
    config keys each stage read there."""
    import subprocess
    import sys

    entry = [str(CONFIG_READS_RECORDER)] if record_reads else ["-m", "ftdeploy.cli"]
    cmd = [sys.executable, *entry, "train-and-serve", "--runs-dir", str(runs),
           "--name", E2E_RUN, "--ollama-host", host, "--json", "-v"]
    env = {**os.environ, "HF_TOKEN": E2E_SECRET, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    if record_reads:
        env["FTDEPLOY_CONFIG_READS"] = str(record_reads)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="session")
def demo_cli_run(ollama_server, tmp_path_factory):
    """The demo, trained and served once a session by the CLI: (its --json summary, the run directory, stderr). The
    CLI's e2e tests read it; the notebook test runs the same config again through the Python API, which skips every
    finished stage (tests/e2e/test_notebook.py sorts before the tests that change this run)."""
    runs = tmp_path_factory.mktemp("runs")
    proc = cli_train_and_serve(runs, ollama_server.host, record_reads=runs.parent / "config-reads.json")
    return json.loads(proc.stdout), runs / E2E_RUN, proc.stderr


def smol_gguf_copy(folder, tag: str):
    """SmolLM2-135M-Instruct as shipped, with a `ftdeploy.test` key of its own: the same model under a digest no
    other test uploads, so tests that share the session's Ollama server do not see each other's blobs."""
    import shutil

    from ftdeploy.base_model import embedded_gguf
    from ftdeploy.stages.export import stamp_metadata

    path = folder / f"smol-{tag}.gguf"
    shutil.copyfile(embedded_gguf("smollm2-135m-instruct"), path)
    return stamp_metadata(path, {"ftdeploy.test": tag})


# ---------------------------------------------------------------- a scripted HTTP server (Ollama's faults)

OK_JSON = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"


def json_reply(body: dict | bytes) -> bytes:
    """A complete HTTP 200 JSON answer that closes the connection."""
    text = body if isinstance(body, bytes) else json.dumps(body).encode()
    return OK_JSON % (len(text), text)


class ScriptedServer:
    """A loopback server: `replies` maps "METHOD /path" prefixes to the bytes sent back (then the connection is
    closed when the reply says `Connection: close`, else held open in silence); an unmatched request is read and
    never answered. `on_request="close"` closes every connection once the request head is in. With `tls=(cert,
    key)` it speaks https with that certificate. `requests` holds each request line received."""

    def __init__(self, replies=None, read_body=True, on_request=None, tls=None):
        self.replies, self.read_body, self.on_request = replies or {}, read_body, on_request
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.tls = None
        if tls:
            import ssl

            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*map(str, tls))
        scheme = "https" if tls else "http"
        self.host = f"{scheme}://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        self.requests: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)  # a client that refuses the certificate fails here
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            if self.on_request == "close":
                conn.close()
                return
            line = head.split(b"\r\n", 1)[0].decode()
            self.requests.append(line)
            reply = next((r for key, r in self.replies.items() if line.startswith(key)), None)
            if reply is not None:
                conn.sendall(reply)
                if b"Connection: close" in reply:
                    conn.close()
                    return
            if self.read_body:
                while conn.recv(65536):
                    pass
            else:
                time.sleep(60)  # neither reads nor answers: the client's sends fill the socket buffers and stall
        except OSError:
            pass

    def close(self):
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def scripted():
    servers = []

    def start(*args, **kw):
        servers.append(ScriptedServer(*args, **kw))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture(params=["guarded", "every-row-fast"])
def data_paths(request, monkeypatch):
    """The data stage's two paths: rows inside the guard's first rows (checked against the one-row definition)
    and the fast path proper (no guard, batches of 3)."""
    from ftdeploy.data import fast

    if request.param == "every-row-fast":
        monkeypatch.setattr(fast, "GUARD_ROWS", 0)
        monkeypatch.setattr(fast, "BATCH_ROWS", 3)
    return request.param


def local_base_with_template(path: Path, chat_template: str) -> Path:
    """A base model directory with only what the preflight template check reads: config and tokenizer_config."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": chat_template, "bos_token": "<s>",
                                                            "eos_token": "</s>"}))
    return path
