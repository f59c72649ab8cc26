"""Hugging Face Hub datasets pinned to a commit. A dataset id (with its revision: a branch, a tag or a commit) is
resolved to the commit it names now (`HfApi().dataset_info(id, revision=...).sha`), and that commit is what the data
stage reads (every pass of the stream alike), what the data stage's fingerprint holds (so an upstream change prepares
the data again) and what the GGUF's provenance names.

When the Hub cannot answer, as decided here:

* a revision that is already a commit (40 hex digits) is used as it is, with no lookup: a commit never moves;
* HF_HUB_OFFLINE set: the commit of the copy `datasets` reads offline, the newest one in its cache (its folders are
  named by commit); none cached is an error naming the dataset and the cache folder, and a commit pinned in the
  config must be that copy;
* the Hub unreachable while online: `HubUnreachable`, naming the dataset and the endpoint, with the way out
  (HF_HUB_OFFLINE=1 reads a cached copy, or pin the revision to a commit). The pipeline's fingerprint then falls back
  to the commit its run's data stage read, so the stages after data run without the Hub (pipeline/artifacts.py);
* no such dataset, a gated one, an unknown revision: a DataError saying which.

HF_ENDPOINT, HF_HUB_OFFLINE and HF_DATASETS_CACHE are read when a dataset is resolved, not when huggingface_hub was
imported. huggingface_hub (and `datasets`, offline) is imported only here, only for a Hub id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..defaults import DEMO_DATA
from ..errors import DataError
from ..optional import require
from .sources import HUB_DATASET_RE, looks_like_path

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
HUB_TIMEOUT = 30.0  # seconds for the one metadata request


class HubUnreachable(DataError):
    """The Hub could not be asked (no connection, a timeout, a server error): the dataset's commit is unknown."""


def is_hub_dataset(spec: str) -> bool:
    """Whether the data stage reads `spec` as a Hub dataset id, as sources.iter_rows decides: not the demo, nothing
    on disk, no path shape, and owner/name."""
    if spec == DEMO_DATA or looks_like_path(spec) or not HUB_DATASET_RE.match(spec):
        return False
    try:
        return not Path(spec).expanduser().exists()
    except (OSError, RuntimeError):
        return False


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_revision(dataset_id: str, revision: str | None = None, hub_config: str | None = None) -> str:
    """The commit `dataset_id` at `revision` (None: its default branch) is read at (see the module's rules)."""
    require("huggingface_hub", f"{dataset_id}: reading a Hub dataset")
    if hub_offline():
        return _offline_revision(dataset_id, revision, hub_config)
    if revision and COMMIT_RE.match(revision):
        return revision
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = hub_endpoint()
    where = f"the Hugging Face Hub at {endpoint}"
    try:
        info = HfApi(endpoint=endpoint).dataset_info(dataset_id, revision=revision, timeout=HUB_TIMEOUT)
    except RevisionNotFoundError:
        raise DataError(f"{dataset_id}: {where} has no revision {revision!r} of this dataset; check the revision "
                        "(data.revision, or the source's revision)") from None
    except GatedRepoError:
        raise DataError(f"{dataset_id}: a gated dataset on {where}: ask for access on its page and set HF_TOKEN") \
            from None
    except RepositoryNotFoundError:
        raise DataError(f"{dataset_id}: no such dataset on {where} (or a private one: set HF_TOKEN)") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status is not None and status < 500:
            raise DataError(f"{dataset_id}: {where} refused the request for this dataset's revision "
                            f"(HTTP {status})") from None
        raise _unreachable(dataset_id, where, f"HTTP {status}") from None
    except Exception as exc:
        if not _transport_error(exc):
            raise
        raise _unreachable(dataset_id, where, f"{type(exc).__name__}: {_first_line(exc)}") from None
    sha = getattr(info, "sha", None)
    if not sha:
        at = f" at {revision}" if revision else ""
        raise DataError(f"{dataset_id}: {where} named no commit for this dataset{at}")
    return str(sha)


def _transport_error(exc: BaseException) -> bool:
    """No answer came: a connection refused, a timeout, a dropped connection (the HTTP library's TransportError,
    whichever library this huggingface_hub uses, or an OSError)."""
    return isinstance(exc, OSError) or any(c.__name__ == "TransportError" for c in type(exc).__mro__)


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:200]


def _unreachable(dataset_id: str, where: str, reason: str) -> HubUnreachable:
    cached = _cached_commits(dataset_id, None)
    way_out = (f"a copy is cached (commit {cached[0][:12]}): HF_HUB_OFFLINE=1 reads it" if cached
               else "pin its revision to a commit, or read a local copy of the dataset")
    return HubUnreachable(f"{dataset_id}: cannot reach {where} to find the commit of this dataset ({reason}); "
                          f"check the connection (or HF_ENDPOINT), or {way_out}")


def _offline_revision(dataset_id: str, revision: str | None, hub_config: str | None) -> str:
    """HF_HUB_OFFLINE: the commit of the newest cached copy, which is the one `datasets` reads offline."""
    cached = _cached_commits(dataset_id, hub_config)
    if not cached:
        raise DataError(f"{dataset_id}: HF_HUB_OFFLINE is set and no copy of this dataset is cached in "
                        f"{_datasets_cache()}; load it once online, or unset HF_HUB_OFFLINE")
    if revision and COMMIT_RE.match(revision) and revision != cached[0]:
        raise DataError(f"{dataset_id}: the revision pinned is commit {revision}, and with HF_HUB_OFFLINE set "
                        f"`datasets` reads the newest cached copy, commit {cached[0]}; load the pinned commit once "
                        "online, or unset HF_HUB_OFFLINE")
    return cached[0]


def _datasets_cache() -> Path:
    env = os.environ.get("HF_DATASETS_CACHE")
    if env:
        return Path(env).expanduser()
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE).expanduser()


def _cached_commits(dataset_id: str, hub_config: str | None) -> list[str]:
    """The commits of the copies of `dataset_id` in `datasets`' cache (owner___name/config/version/commit), newest
    first; empty where `datasets` is not installed or nothing is cached."""
    try:
        root = _datasets_cache()
    except ImportError:
        return []
    owner, _, name = dataset_id.partition("/")
    # datasets names the folder with the name in snake case (datasets.naming.camelcase_to_snakecase)
    snake = re.sub(r"([a-z\d])([A-Z])", r"\1_\2", re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)).lower()
    folders = [p for p in (root / f"{owner}___{snake}").glob(f"{hub_config or '*'}/*/*")
               if p.is_dir() and COMMIT_RE.match(p.name)]
    return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]
