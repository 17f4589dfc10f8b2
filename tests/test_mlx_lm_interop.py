"""Folders shared with mlx-lm: its `convert` output loads in mlx_llm, ours loads in mlx-lm, same logits.

mlx-lm's Llama 4 hard-codes the released layer pattern (NoPE every 4th layer, chunked attention on
the others, top-1 routing), which the tiny config follows. mlx-lm also quantizes the router; ours
keeps it in float: each loader swaps exactly the layers whose `scales` it finds.
Measured max |logit difference| in float32: ~3.5e-5 either way (different op orders), checked at 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from folders import write_hf
from tiny import random_weights, tiny_args

from apps.convert import convert
from apps.convert_io import read_header
from common.args import QuantizationArgs

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")
ARGS = tiny_args(dim=128, head_dim=32, ffn_hidden_dim=256, moe_hidden_dim=128, vocab_size=256)
TOKENS = np.random.default_rng(1).integers(0, 256, (2, 30))


def _hf_source(folder: Path) -> Path:
    """A tiny Llama4ForConditionalGeneration folder with a word-level tokenizer mlx-lm can open."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    write_hf(folder, ARGS, random_weights(ARGS, seed=21), conditional=True)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(ARGS.vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "unk_token": "t0"}))
    return folder


def _mlx_lm_logits(folder: Path) -> np.ndarray:
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    return np.array(model(mx.array(TOKENS)).astype(mx.float32))


def _our_logits(folder: Path) -> np.ndarray:
    from backends import MlxBackend

    from mlx_llm import load_model

    return MlxBackend().forward(load_model(folder), TOKENS)


@pytest.mark.parametrize("bits", [4, 8])
def test_mlx_lm_convert_loads_in_mlx_llm(tmp_path: Path, bits: int) -> None:
    from mlx_lm.convert import convert as mlx_lm_convert

    out = tmp_path / "mlx-lm"
    mlx_lm_convert(str(_hf_source(tmp_path / "src")), str(out), quantize=True, q_group_size=64, q_bits=bits)
    keys = read_header(out / "model.safetensors")[1]
    assert "language_model.model.layers.1.feed_forward.router.scales" in keys  # mlx-lm quantizes the router
    ours, theirs = _our_logits(out), _mlx_lm_logits(out)
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_our_convert_loads_in_mlx_lm(tmp_path: Path, bits: int) -> None:
    out = convert(_hf_source(tmp_path / "src"), tmp_path / "ours", QuantizationArgs(group_size=64, bits=bits))
    np.testing.assert_allclose(_mlx_lm_logits(out), _our_logits(out), atol=1e-4, rtol=0)


def test_text_only_source_loads_in_mlx_lm(tmp_path: Path) -> None:
    """A `llama4_text` source is written in the nested `llama4` form, the only one mlx-lm knows."""
    src = write_hf(tmp_path / "src", ARGS, random_weights(ARGS, seed=22))
    out = convert(src, tmp_path / "ours", QuantizationArgs(group_size=32, bits=4))
    assert json.loads((out / "config.json").read_text())["text_config"]["model_type"] == "llama4_text"
    np.testing.assert_allclose(_mlx_lm_logits(out), _our_logits(out), atol=1e-4, rtol=0)
