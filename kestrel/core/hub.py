"""Which Hugging Face hub ids the service may use, and failing fast when the hub cannot serve one.

A hub id in a request makes a worker read the local Hugging Face cache and, failing that, the
network. Without limits any client could make a worker download any repository, or (without a
network) hold it for as long as the HTTP client retries, which was most of a minute per id. So:

- **An allowlist** (``KESTREL_ALLOWED_MODELS`` / ``KESTREL_ALLOWED_DATASETS``: comma-separated
  ``fnmatch`` globs, matched case-insensitively as the hub matches ids) says which ids may be
  fetched. Ids already in the local cache are always allowed: loading them reads no network, and
  the operator (or an earlier allowed download) put them there. The default, no globs, therefore
  means "bundled and local models, and what is cached": nothing a client names can make a worker
  download; ``*`` allows any id.
- **Offline by default** (``kestrel up`` and compose set ``HF_HUB_OFFLINE=1`` unless the operator
  set it): an allowed id that is not cached fails at once with ``HubUnavailableError`` (424).
- **Online, one bounded probe**: before a download the hub is asked about the repository once with
  a short timeout, so an unreachable hub fails within that timeout (424) and a missing repository
  with a 404, instead of each file's download retrying.

Nothing here imports torch, transformers or datasets: the API calls ``check_allowed`` before it
enqueues anything.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from kestrel.core.errors import HubUnavailableError, InvalidInputError, NotFoundError

RepoType = Literal["model", "dataset"]
SETTING = {"model": "KESTREL_ALLOWED_MODELS", "dataset": "KESTREL_ALLOWED_DATASETS"}
DEFAULT_PROBE_TIMEOUT_S = 10.0
# Hub ids (`org/name` or a bare canonical name): letters, digits, '.', '_' and '-' in each part,
# never '..' and never more than one '/'. Anything else could be read as a path by the worker.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


def validate_hub_id(name: str, what: str) -> str:
    """A hub id that cannot be mistaken for a path; raises ValueError (a 422 in a request) otherwise."""
    if not HUB_ID.fullmatch(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a Hugging Face hub id like 'org/name'")
    return name


def matches(name: str, patterns: Sequence[str]) -> bool:
    """True when ``name`` matches one of the globs (case-insensitive, as hub ids are)."""
    lowered = name.lower()
    return any(
        fnmatch.fnmatchcase(lowered, pattern.strip().lower()) for pattern in patterns if pattern.strip()
    )


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _datasets_cache() -> Path:
    """Where ``datasets`` keeps prepared datasets (without importing it: it is slow to import)."""
    from huggingface_hub import constants

    return Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")


def is_cached(name: str, repo_type: RepoType) -> bool:
    """True when the local cache holds a snapshot of the repository (a file check, no network)."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = _hub_cache() / repo_folder_name(repo_id=name, repo_type=repo_type) / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if repo_type == "dataset":  # prepared by `datasets` (its own cache layout: org___name)
        prepared = _datasets_cache() / name.replace("/", "___")
        return prepared.is_dir() and any(prepared.iterdir())
    return False


def check_allowed(name: str, repo_type: RepoType, patterns: Sequence[str]) -> str:
    """Accept a hub id that is cached or matches the allowlist; InvalidInputError (422) otherwise.

    The message names the setting, so the operator knows what to change and a client knows the
    refusal is policy, not a typo of theirs.
    """
    if matches(name, patterns) or is_cached(name, repo_type):
        return name
    setting = SETTING[repo_type]
    allowed = ", ".join(patterns) if patterns else "none besides those already in the local cache"
    raise InvalidInputError(
        f"{repo_type} {name!r} is not allowed: it is not in the local Hugging Face cache and matches "
        f"no pattern of {setting} (allowed hub ids: {allowed}); the operator can allow it, or use "
        "*, in that setting",
        details={repo_type: name, "setting": setting, "allowed": list(patterns)},
    )


def require_reachable(name: str, repo_type: RepoType, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S) -> None:
    """Before a download: fail at once offline, and within ``timeout_s`` when the hub does not answer.

    A repository the hub says does not exist is a NotFoundError (404); anything else the hub
    answers (a gated repository, say) is left to the download, which reports it.
    """
    what = f"{repo_type} {name!r}"
    if hub_offline():
        raise HubUnavailableError(
            f"{what} is not in the local Hugging Face cache and the service is offline "
            "(HF_HUB_OFFLINE is set), so it cannot be downloaded; put it in the workers' cache "
            f"(`hf download {name}{' --repo-type dataset' if repo_type == 'dataset' else ''}`) or let "
            "the workers reach the hub (HF_HUB_OFFLINE=0)",
            details={repo_type: name, "offline": True},
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()
    probe = api.model_info if repo_type == "model" else api.dataset_info
    try:
        probe(name, timeout=timeout_s)
    except RepositoryNotFoundError:
        raise NotFoundError(
            f"{what} does not exist on the Hugging Face hub (or is private)", details={repo_type: name}
        ) from None
    except HfHubHTTPError:
        return  # the hub answered: the download reports what it said
    except Exception as exc:  # connection refused, DNS, timeout: the hub is not reachable
        raise HubUnavailableError(
            f"{what} is not in the local Hugging Face cache and the hub did not answer within "
            f"{timeout_s:g} s ({type(exc).__name__}: {exc}); retry later, or put it in the workers' "
            "cache",
            details={repo_type: name, "offline": False, "timeout_s": timeout_s},
        ) from exc
