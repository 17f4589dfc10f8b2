"""Model folders from the Hugging Face Hub: `org/name` wherever a folder is taken.

A local folder of that name wins. Otherwise `huggingface_hub.snapshot_download` fetches, into the
standard cache (`HF_HOME`, resumable, with its progress bars, `HF_TOKEN` for gated repos,
`HF_HUB_OFFLINE=1` for the cache alone), only the files the loader reads for the repo's layout:
first the small files that tell the layout, then the config, weights and tokenizer of that layout
(at the repo's top level: Meta's `original/` copies and other formats are never fetched).
"""

from __future__ import annotations

import re
from pathlib import Path

from common.files import ModelFolderError, read_json

PROBE = ("config.json", "params.json", "model.safetensors.index.json")
HF_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer.model",
            "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.json",
            "chat_template.jinja", "preprocessor_config.json", "processor_config.json")
META_FILES = ("params.json", "consolidated.*.pth", "tokenizer.model")
_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_id(name: str) -> bool:
    return bool(_ID.fullmatch(name)) and ".." not in name


def resolve_model(name: str | Path, revision: str | None = None) -> Path:
    """The local folder for `name`: itself when it exists (or is no Hub id), else the Hub snapshot."""
    path = Path(name).expanduser()
    if path.exists() or not is_hub_id(str(name)):
        return path
    return _download(str(name), revision)


def allow_patterns(probe: Path, repo: str) -> list[str]:
    """The files to fetch for the layout the probe files show (names anchored at the repo's top level)."""
    if (probe / "config.json").is_file():
        index = probe / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            shards = sorted(set(map(str, weight_map.values()))) if isinstance(weight_map, dict) else []
        else:
            shards = ["model.safetensors", "model-*.safetensors"]
        return [*HF_FILES, *shards]
    if (probe / "params.json").is_file():
        return list(META_FILES)
    found = sorted(p.name for p in probe.iterdir()) if probe.is_dir() else []
    raise ModelFolderError(f"{repo}: no Llama 4 model files (config.json with safetensors, or params.json with "
                           f"consolidated.NN.pth); the repo holds {', '.join(_listing(repo, found)) or 'nothing'}")


def _listing(repo: str, found: list[str]) -> list[str]:
    """What the repo holds, for the error: the Hub's file list when it can be reached, else the cache's."""
    try:
        from huggingface_hub import HfApi

        found = HfApi().list_repo_files(repo)
    except Exception:  # noqa: BLE001 - offline or refused: the cached names say enough
        pass
    return found[:10] + ([f"... ({len(found) - 10} more)"] if len(found) > 10 else [])


def _download(repo: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        probe = Path(snapshot_download(repo, revision=revision, allow_patterns=list(PROBE)))
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns(probe, repo)))
    except GatedRepoError as e:
        raise ModelFolderError(f"{repo} is gated: accept its license at https://huggingface.co/{repo}, then set "
                               "HF_TOKEN to a token of that account (or run `hf auth login`)") from e
    except RepositoryNotFoundError as e:
        raise ModelFolderError(f"{repo}: no such model on the Hugging Face Hub (nor a local folder of that name; "
                               "a private repo needs HF_TOKEN)") from e
    except RevisionNotFoundError as e:
        raise ModelFolderError(f"{repo}: no revision {revision!r} on the Hugging Face Hub") from e
    except LocalEntryNotFoundError as e:
        raise ModelFolderError(f"{repo}{'' if revision is None else '@' + revision} is not in the Hugging Face "
                               "cache and the Hub cannot be reached (offline, HF_HUB_OFFLINE=1, or no network)") from e
    except HfHubHTTPError as e:
        raise ModelFolderError(f"{repo}: the Hugging Face Hub refused the download ({str(e).splitlines()[0]})") from e
