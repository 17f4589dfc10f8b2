"""Writing tiny model folders in every supported layout, for loader tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from common.args import ModelArgs
from common.checkpoint import canonical_to_hf, canonical_to_meta
from common.hf_config import to_hf_text_config

# A params.json whose derived widths (dense 176, experts 48) follow Meta's formulas.
TINY_PARAMS = {
    "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128, "multiple_of": 16,
    "ffn_dim_multiplier": 1.0, "ffn_exp": 2.0, "norm_eps": 1e-5, "rope_theta": 10000.0,
    "nope_layer_interval": 4, "attention_chunk_size": 8, "use_qk_norm": True,
    "moe_args": {"num_experts": 4, "top_k": 1, "interleave_moe_layer_step": 2},
}


def meta_args() -> ModelArgs:
    return ModelArgs.from_params(TINY_PARAMS)


def write_hf(folder: Path, args: ModelArgs, weights: dict[str, np.ndarray], shards: int = 1,
             conditional: bool = False, extra: dict[str, np.ndarray] | None = None) -> Path:
    """config.json + model.safetensors (or N shards with an index)."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in canonical_to_hf(weights, args, conditional=conditional).items()}
    tensors.update(extra or {})
    text = to_hf_text_config(args)
    config = ({"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "text_config": text}
              if conditional else text)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, str(folder / fname))
        weight_map.update({k: fname for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def write_meta(folder: Path, weights: dict[str, np.ndarray], shards: int = 1, params: dict | None = None) -> Path:
    """params.json + consolidated.NN.pth in the released files' fused layout, with an _extra_state entry."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params or TINY_PARAMS))
    for rank, sd in enumerate(canonical_to_meta(weights, meta_args(), n_shards=shards)):
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
        tensors["layers.0.attention.wqkv._extra_state"] = io.BytesIO(b"fp8 info")
        torch.save(tensors, folder / f"consolidated.{rank:02d}.pth")
    return folder
