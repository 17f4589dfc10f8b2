"""`apps.convert` on a ConditionalGeneration folder whose weights hold only the language model while
its config keeps a vision_config (a text-only export): converted as the text model with one warning,
loadable on both backends and in mlx-lm; partial vision weights stay an error naming them; images on
such a model say the folder has no vision weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from folders import write_hf
from test_convert import QARGS, REL_TOL, TOKENS, _rel
from test_vision import VISION
from tiny import random_weights

from apps.convert import convert, main
from common.args import QuantizationArgs
from common.array_ops import CheckpointError
from common.sampling import SamplingParams

WEIGHTS = random_weights(QARGS, seed=13)


def text_only_export(folder: Path, extra: dict[str, np.ndarray] | None = None) -> Path:
    write_hf(folder, QARGS, WEIGHTS, conditional=True, extra=extra)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vision_config": VISION.to_hf_config()}))
    return folder


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_text_only_export_converts_as_the_text_model(backend, bits: int | None, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    src = text_only_export(tmp_path / "src")
    flags = ["--model", str(src), "--out", str(tmp_path / "out")] + (["-q", "--q-bits", str(bits)] if bits else [])
    assert main(flags) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "no vision weights" in warnings[0]
    assert "vision_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    model = backend.module.load_model(tmp_path / "out", dtype="float32")
    assert model.args.vision_args is None
    got, want = backend.forward(model, TOKENS), backend.forward(backend.build(QARGS, WEIGHTS), TOKENS)
    if bits is None:
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    else:
        assert _rel(got, want) < REL_TOL[bits]


def test_text_only_output_loads_in_mlx_lm(tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    from test_mlx_lm_interop import _mlx_lm_logits, _our_logits

    out = convert(text_only_export(tmp_path / "src"), tmp_path / "out", QuantizationArgs(group_size=64, bits=4))
    np.testing.assert_allclose(_mlx_lm_logits(out), _our_logits(out), atol=1e-4, rtol=0)


def test_partial_vision_weights_stay_an_error_naming_them(tmp_path: Path) -> None:
    projector = {"multi_modal_projector.linear_1.weight": np.zeros((QARGS.dim, VISION.output_dim), np.float32)}
    src = text_only_export(tmp_path / "src", extra=projector)
    with pytest.raises(CheckpointError, match=r"missing \d+ key\(s\): vision_embeddings"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_images_on_a_text_only_export_say_the_folder_has_no_vision_weights(backend, tmp_path: Path) -> None:
    from test_vision_load import _pictures

    from common.tokenizer import load_tokenizer_files

    src = text_only_export(tmp_path / "src")
    from test_mlx_lm_interop import _hf_source  # a word-level tokenizer beside the weights

    _hf_source(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_bytes((tmp_path / "tok" / name).read_bytes())
    model = backend.module.load_model(src, dtype="float32")
    tok = load_tokenizer_files(src)
    with pytest.raises(ValueError, match="vision_config but no vision weights"):
        list(backend.module.stream_generate(model, tok, "t1 t2", 2, SamplingParams(), images=_pictures(tmp_path)))
