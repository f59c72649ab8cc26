"""Hub datasets pinned to a commit (data/hub.py): the commit a dataset id resolves to is read, fingerprinted and named
in the GGUF's provenance. No hub is reachable from these machines: a local HTTP server answers the dataset-info
endpoint the way the Hub does, through HF_ENDPOINT."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import build_tiny_tokenizer, chat_mapping

from ftdeploy.config import load_config
from ftdeploy.data import prepare_data
from ftdeploy.data.hub import HubUnreachable, hub_revision, is_hub_dataset
from ftdeploy.errors import DataError
from ftdeploy.pipeline import Context, fingerprint, plan_stages
from ftdeploy.pipeline.artifacts import data_files, dataset_provenance
from ftdeploy.runs import Run

DATASET = "acme/zephyr-facts"
SHA_A, SHA_B = "a" * 40, "b" * 40


class FakeHub:
    """Answers GET /api/datasets/<id>[/revision/<rev>] as the Hub does: the dataset's info with its commit `sha`;
    404 with the Hub's error codes for another id or an unknown revision."""

    def __init__(self):
        self.sha, self.revisions, self.requests = SHA_A, {"v1": "c" * 40}, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.requests.append(self.path)
                prefix = f"/api/datasets/{DATASET}"
                if self.path.split("?")[0] == prefix:
                    self._json(200, {"_id": "1", "id": DATASET, "sha": hub.sha, "private": False, "tags": []})
                elif self.path.startswith(prefix + "/revision/"):
                    rev = self.path.split("/revision/", 1)[1].split("?")[0]
                    if rev in hub.revisions:
                        self._json(200, {"_id": "1", "id": DATASET, "sha": hub.revisions[rev], "tags": []})
                    else:
                        self._json(404, {"error": "Invalid rev id"}, "RevisionNotFound")
                else:
                    self._json(404, {"error": "Repository not found"}, "RepoNotFound")

            def _json(self, status, body, error_code=None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code:
                    self.send_header("X-Error-Code", error_code)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))  # nothing cached
    yield hub
    hub.close()


def _context(tmp_path, *overrides):
    cfg = load_config(None, ["base_model=smollm2-135m-instruct", f"data.train={DATASET}", f"runs_dir={tmp_path}",
                             *overrides])
    return Context(cfg, Run(cfg.run_dir))


def _data_done(ctx):
    """The data stage recorded done with this context's fingerprint, its output there."""
    ctx.run.data_dir.mkdir(parents=True, exist_ok=True)
    (ctx.run.data_dir / "train.jsonl").write_text("{}\n")
    ctx.run.update(stages={"data": {"status": "done", "fingerprint": fingerprint(ctx, "data"),
                                    "outputs": {"revisions": {DATASET: SHA_A}}}})


def test_the_commit_enters_the_fingerprint_and_an_upstream_change_prepares_the_data_again(fake_hub, tmp_path):
    ctx = _context(tmp_path)
    assert data_files(ctx.cfg)[0] == f"{DATASET}@{SHA_A}"  # (a) the commit, not the bare id
    _data_done(ctx)
    assert dict(plan_stages(_context(tmp_path)))["data"] is False  # unchanged upstream: skipped
    fake_hub.sha = SHA_B  # (b) a new commit upstream
    later = _context(tmp_path)
    assert dict(plan_stages(later))["data"] is True
    assert fingerprint(later, "data") != fingerprint(ctx, "data")
    assert f"/api/datasets/{DATASET}" in fake_hub.requests


def test_a_revision_is_resolved_at_its_commit_and_a_commit_is_never_looked_up(fake_hub):
    assert hub_revision(DATASET, "v1") == "c" * 40
    asked = len(fake_hub.requests)
    assert hub_revision(DATASET, "d" * 40) == "d" * 40
    assert len(fake_hub.requests) == asked
    with pytest.raises(DataError, match=rf"{DATASET}: the Hugging Face Hub at {fake_hub.endpoint} has no revision "
                                        r"'v9' of this dataset"):
        hub_revision(DATASET, "v9")
    with pytest.raises(DataError, match=rf"acme/other: no such dataset on the Hugging Face Hub at "
                                        rf"{fake_hub.endpoint} \(or a private one: set HF_TOKEN\)"):
        hub_revision("acme/other")


def test_an_unreachable_hub_names_the_dataset_and_the_host(monkeypatch, tmp_path):
    """(c) Nothing listens there: the error names the dataset and the endpoint, and what to do."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(HubUnreachable) as err:
        data_files(_context(tmp_path).cfg)
    message = str(err.value)
    assert message.startswith(f"{DATASET}: cannot reach the Hugging Face Hub at http://127.0.0.1:{port} to find "
                              "the commit of this dataset (ConnectError")
    assert "HF_ENDPOINT" in message and "pin its revision to a commit" in message
    # A copy in datasets' cache: the error says HF_HUB_OFFLINE=1 reads it
    (tmp_path / "cache" / "acme___zephyr-facts" / "default" / "0.0.0" / SHA_B).mkdir(parents=True)
    with pytest.raises(HubUnreachable, match=rf"a copy is cached \(commit {SHA_B[:12]}\): HF_HUB_OFFLINE=1 reads it"):
        hub_revision(DATASET)


def test_an_unreachable_hub_falls_back_to_the_commit_this_runs_data_stage_read(fake_hub, tmp_path, caplog):
    """So merge, export and register run without the Hub; a run that never read the dataset still fails."""
    ctx = _context(tmp_path)
    _data_done(ctx)
    fake_hub.close()
    assert data_files(_context(tmp_path).cfg)[0] == f"{DATASET}@{SHA_A}"
    assert "Using the commit this run's data stage read" in caplog.text
    with pytest.raises(HubUnreachable):
        data_files(_context(tmp_path, "name=another-run").cfg)


def test_offline_the_commit_is_the_cached_copys(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE: the newest copy in datasets' cache (the one datasets reads offline), no network."""
    import os
    import time

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # never asked
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=rf"{DATASET}: HF_HUB_OFFLINE is set and no copy of this dataset is cached in "
                                        rf"{tmp_path}"):
        hub_revision(DATASET)
    old = tmp_path / "acme___zephyr-facts" / "default" / "0.0.0" / SHA_A
    new = tmp_path / "acme___zephyr-facts" / "default" / "0.0.0" / SHA_B
    old.mkdir(parents=True)
    new.mkdir(parents=True)
    os.utime(old, (time.time() - 100, time.time() - 100))
    assert hub_revision(DATASET, "main") == SHA_B
    with pytest.raises(DataError, match=f"the revision pinned is commit {SHA_A}.*newest cached copy, commit {SHA_B}"):
        hub_revision(DATASET, SHA_A)


def test_the_data_stage_reads_the_commit_and_records_it_and_the_provenance_names_it(fake_hub, tmp_path,
                                                                                      monkeypatch):
    import datasets

    loaded = []

    def load_dataset(path, name=None, split=None, revision=None, **kw):
        loaded.append((path, revision))
        return [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
                for i in range(6)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    tok = build_tiny_tokenizer()
    cfg = load_config(None, [f"data.train={DATASET}", "data.revision=v1", "data.eval_split=0"])
    stats = prepare_data(cfg.data, tok, chat_mapping(tok), tmp_path / "data", seed=0)
    assert stats.revisions == {DATASET: "c" * 40} and stats.rows == 6
    assert loaded and all(call == (DATASET, "c" * 40) for call in loaded)  # every pass at the commit
    assert json.loads((tmp_path / "data" / "stats.json").read_text())["revisions"] == {DATASET: "c" * 40}
    ctx = _context(tmp_path, "data.revision=v1")
    ctx.run.update(stages={"data": {"status": "done", "outputs": {"revisions": stats.revisions}}})
    fake_hub.revisions["v1"] = SHA_B  # moved since: the provenance names what was trained
    assert dataset_provenance(ctx) == f"dataset {DATASET}@{'c' * 40}"


def test_only_what_is_read_as_a_hub_id_is_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert is_hub_dataset("acme/data") and not is_hub_dataset("demo") and not is_hub_dataset("x.jsonl")
    assert not is_hub_dataset("local/data") and not is_hub_dataset("./acme/data")
