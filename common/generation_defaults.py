"""Sampling defaults a model folder declares in `generation_config.json` (transformers' file), which
the command-line programs and the server use where a request or flag leaves a value unset."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.files import ModelFolderError

# generation_config.json key -> SamplingParams field
KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
        "repetition_penalty": "repetition_penalty"}


def generation_defaults(folder: str | Path) -> dict[str, Any]:
    """SamplingParams fields from `folder/generation_config.json` ({} without one); `do_sample: false`
    means greedy (temperature 0), as in transformers."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path}: expected a JSON object, got {type(config).__name__}")
    out: dict[str, Any] = {}
    for key, field in KEYS.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelFolderError(f"{path}: '{key}' must be a number, got {value!r}")
        out[field] = int(value) if field == "top_k" else float(value)
    if config.get("do_sample") is False:
        out["temperature"] = 0.0
    return out
