"""The bundled demo model: its recorded held-out loss on both backends, and identical greedy text."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DEMO = Path(__file__).parent.parent / "apps" / "demo_model"
SEQ_LEN = 256


def _load(backend, dtype: str = "float32"):
    if backend.name == "mlx":
        import mlx_llm as module

        return module, module.load(DEMO, dtype=dtype)
    import torch_backend as module

    return module, module.load(DEMO, dtype=dtype, device="cpu")


def heldout_loss(backend, model) -> float:
    """Mean next-token cross-entropy over the saved held-out windows, as apps.train_demo computes it."""
    tokens = np.load(DEMO / "heldout_tokens.npy").astype(np.int64)
    windows = tokens[: len(tokens) // SEQ_LEN * SEQ_LEN].reshape(-1, SEQ_LEN)  # [N, L]
    logits = backend.forward(model, windows[:, :-1]).astype(np.float64)  # [N, L-1, V]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)  # [N, L-1]
    picked = np.take_along_axis(logits, windows[:, 1:, None], axis=-1)[..., 0]
    return float((logz - picked).mean())


def test_heldout_loss_matches_record(backend) -> None:
    recorded = json.loads((DEMO / "eval.json").read_text())["heldout_loss_eval_slice"]
    _, (model, _) = _load(backend)
    assert abs(heldout_loss(backend, model) - recorded) < 1e-3


def test_greedy_text_identical_across_backends() -> None:
    pytest.importorskip("mlx")
    pytest.importorskip("torch")
    import mlx_llm
    import torch_backend

    texts = []
    for module, kwargs in ((mlx_llm, {}), (torch_backend, {"device": "cpu"})):
        model, tok = module.load(DEMO, dtype="float32", **kwargs)
        texts.append(module.generate(model, tok, "def fibonacci(n):", max_tokens=48))
    assert texts[0] == texts[1]
    assert "def " in texts[0] or "return" in texts[0] or '"""' in texts[0]  # it continues with Python
