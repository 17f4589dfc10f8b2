"""`python -m apps.generate` end to end, in a subprocess, as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from backends import available

ROOT = Path(__file__).parent.parent


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apps.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, input=stdin)


def test_default_run_prints_text() -> None:
    r = run("--max-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip()) > 10
    assert "tokens/s" in r.stderr and "peak memory" in r.stderr


@pytest.mark.parametrize("name", ["mlx", "torch"])
def test_each_backend(name: str) -> None:
    if name not in available():
        pytest.skip(f"{name} is not installed")
    r = run("--backend", name, "--prompt", "import os\n", "--max-tokens", "16", "--temperature", "0.8",
            "--top-p", "0.9", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert f"backend: {name}" in r.stderr


def test_chat_keeps_going_between_turns() -> None:
    r = run("--chat", "--max-tokens", "8", stdin="def add(a, b):\nclass Stack:\n")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("prompt: ") == 2


def test_missing_model_folder(tmp_path: Path) -> None:
    r = run("--model", str(tmp_path / "nope"))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr


def test_corrupt_weights(tmp_path: Path) -> None:
    demo = ROOT / "apps" / "demo_model"
    for f in ("config.json", "tokenizer.model"):
        (tmp_path / f).write_bytes((demo / f).read_bytes())
    (tmp_path / "model.safetensors").write_bytes((demo / "model.safetensors").read_bytes()[:100_000])
    r = run("--model", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "model.safetensors" in r.stderr


def test_bad_flag_is_usage_error() -> None:
    r = run("--no-such-flag")
    assert r.returncode == 2
    assert "usage" in r.stderr


def test_prompt_longer_than_context(tmp_path: Path) -> None:
    r = run("--prompt", "x = 1\n" * 3000, "--max-tokens", "4")
    assert r.returncode == 1
    assert "context" in r.stderr and r.stderr.strip().count("\n") == 0


def test_sampling_flags_override_the_folders_generation_config() -> None:
    from apps.generate import build_parser, sampling_from
    from common.sampling import SamplingParams

    args = build_parser().parse_args([])
    assert sampling_from(args) == SamplingParams(temperature=0.0, repetition_penalty=1.1)  # the demo's file
    args = build_parser().parse_args(["--repetition-penalty", "1.0", "--frequency-penalty", "0.5",
                                      "--presence-penalty", "0.2", "--temperature", "0.7", "--seed", "4"])
    assert sampling_from(args) == SamplingParams(temperature=0.7, repetition_penalty=1.0, frequency_penalty=0.5,
                                                 presence_penalty=0.2, seed=4)
    r = run("--frequency-penalty", "7", "--max-tokens", "2")
    assert r.returncode == 1 and "frequency_penalty" in r.stderr.strip().splitlines()[-1]


def test_generation_config_values_are_checked(tmp_path: Path) -> None:
    from common.files import ModelFolderError
    from common.generation_defaults import generation_defaults

    (tmp_path / "generation_config.json").write_text('{"temperature": "hot"}')
    with pytest.raises(ModelFolderError, match="generation_config.json.*temperature"):
        generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"do_sample": true, "temperature": 0.6, "top_p": 0.9}')
    assert generation_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.9}
