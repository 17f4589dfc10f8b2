"""Hugging Face Hub ids wherever a folder is taken, resolved from a Hub cache built here in its real
layout (`models--org--name/snapshots/<rev>`, `refs/main`) with HF_HUB_OFFLINE=1: no network."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from folders import meta_args, write_hf, write_meta
from tiny import random_weights, tiny_args

from benchmarks._synthetic import write_tokenizer
from common.files import ModelFolderError
from common.hub import HF_FILES, META_FILES, allow_patterns, resolve_model

pytest.importorskip("huggingface_hub")
ROOT = Path(__file__).resolve().parent.parent
ARGS = tiny_args(vocab_size=512)
REV = "0123456789abcdef0123456789abcdef01234567"


def _repo(home: Path, repo: str) -> Path:
    """An empty snapshot of `repo` at REV, which refs/main points to."""
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text(REV)
    snap = base / "snapshots" / REV
    snap.mkdir(parents=True, exist_ok=True)
    return snap


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hub cache with org/tiny (HF layout, 2 shards), org/meta (Meta layout) and org/readme (no model)."""
    from huggingface_hub import constants

    home = tmp_path / "hf"
    snap = write_hf(_repo(home, "org/tiny"), ARGS, random_weights(ARGS, seed=3), shards=2)
    write_tokenizer(snap, ARGS.vocab_size)
    write_meta(_repo(home, "org/meta"), random_weights(meta_args(), seed=4))
    (_repo(home, "org/readme") / "README.md").write_text("# nothing here")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home


def test_a_model_loads_by_id_as_by_folder(backend, hub: Path) -> None:
    tokens = np.random.default_rng(0).integers(0, ARGS.vocab_size, (1, 20))
    by_id = backend.module.load_model("org/tiny", dtype="float32")
    folder = hub / "hub" / "models--org--tiny" / "snapshots" / REV
    by_folder = backend.module.load_model(folder, dtype="float32")
    np.testing.assert_array_equal(backend.forward(by_id, tokens), backend.forward(by_folder, tokens))
    assert backend.module.load_tokenizer("org/tiny").encode("t5 t9", bos=False) == [5, 9]
    meta = backend.module.load_model("org/meta", dtype="float32")
    assert meta.args.n_layers == meta_args().n_layers


def test_cli_takes_an_id_and_reports_a_missing_one_in_one_line(hub: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HOME=str(hub), HF_HUB_OFFLINE="1")
    base = [sys.executable, "-m", "apps.generate", "--backend", "torch", "--max-tokens", "4", "--prompt", "t1 t2"]
    ok = subprocess.run([*base, "--model", "org/tiny"], env=env, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip()
    missing = subprocess.run([*base, "--model", "org/nope"], env=env, capture_output=True, text=True, timeout=120)
    lines = missing.stderr.strip().splitlines()
    assert missing.returncode == 1 and len(lines) == 1
    assert lines[0].startswith("error: org/nope is not in the Hugging Face cache")


def test_a_repo_without_llama4_files_names_what_it_holds(hub: Path) -> None:
    with pytest.raises(ModelFolderError, match="no Llama 4 model files.*README.md"):
        resolve_model("org/readme")


def test_a_local_folder_of_that_name_wins(hub: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "tiny").mkdir(parents=True)
    assert resolve_model("org/tiny") == Path("org/tiny")
    assert resolve_model("./not/an-id/here") == Path("./not/an-id/here")  # a path, never a Hub lookup


def test_only_the_files_of_the_layout_are_fetched(hub: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[list[str]] = []
    real = huggingface_hub.snapshot_download

    def recording(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append(list(allow_patterns))
        return real(repo_id, revision=revision, allow_patterns=allow_patterns, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    resolve_model("org/tiny")
    probe, hf = calls
    assert probe == ["config.json", "params.json", "model.safetensors.index.json"]
    assert hf == [*HF_FILES, "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    calls.clear()
    resolve_model("org/meta")
    assert calls[1] == list(META_FILES) == ["params.json", "consolidated.*.pth", "tokenizer.model"]
    snap = hub / "hub" / "models--org--tiny" / "snapshots" / REV
    (snap / "model.safetensors.index.json").rename(snap / "index.bak")
    assert allow_patterns(snap, "org/tiny")[-2:] == ["model.safetensors", "model-*.safetensors"]
    # Meta's repos also carry the native files under original/, and other formats: never fetched
    others = ["original/params.json", "original/consolidated.00.pth", "original/tokenizer.model",
              "pytorch_model.bin", "model.gguf", "original/model.safetensors"]
    for patterns in (hf, list(META_FILES)):
        assert not [f for f in others for p in patterns if fnmatch.fnmatch(f, p)]
