"""Tiny configurations and deterministic random weights for tests."""

from __future__ import annotations

import dataclasses

import numpy as np

from common.args import ModelArgs, MoEArgs, RopeScaling
from common.names import canonical_shapes, is_norm


def tiny_args(**overrides: object) -> ModelArgs:
    """4 layers: dense/MoE interleaved, layer 3 NoPE, chunk 8, QK norm, GQA 4:2."""
    base = dict(
        dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=128, head_dim=16,
        ffn_hidden_dim=96, moe_hidden_dim=48, norm_eps=1e-5, rope_theta=10000.0,
        attention_chunk_size=8, use_qk_norm=True, attn_temperature_tuning=True,
        floor_scale=8192.0, attn_scale=0.1,
        moe_args=MoEArgs(num_experts=4, top_k=1, interleave_moe_layer_step=2),
        rope_layers=(True, True, True, False), moe_layers=(1, 3), max_seq_len=512,
    )
    base.update(overrides)
    return ModelArgs(**base)


def random_weights(args: ModelArgs, seed: int = 0, scale: float = 0.08) -> dict[str, np.ndarray]:
    """Canonical float32 weights; norm weights drawn far from 1 so norm mistakes show."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in canonical_shapes(args).items():
        if is_norm(name):
            out[name] = rng.uniform(0.5, 1.8, size=shape).astype(np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * scale).astype(np.float32)
    return out


def replace(args: ModelArgs, **changes: object) -> ModelArgs:
    return dataclasses.replace(args, **changes)


CONFIGS = {
    "dense_moe": tiny_args(),
    "all_moe": tiny_args(moe_args=MoEArgs(num_experts=4, top_k=2, interleave_moe_layer_step=1),
                         moe_layers=(0, 1, 2, 3)),
    "top1_of_8": tiny_args(moe_args=MoEArgs(num_experts=8, top_k=1, interleave_moe_layer_step=1),
                           moe_layers=(0, 1, 2, 3)),
    "no_qk_norm": tiny_args(use_qk_norm=False),
    "temp_tuning": tiny_args(floor_scale=4.0, attn_scale=0.5),
    "llama3_rope": tiny_args(rope_scaling=RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=32)),
    "llama3_rope_low_eq_high": tiny_args(rope_scaling=RopeScaling(
        factor=16.0, low_freq_factor=1.0, high_freq_factor=1.0, original_max_position_embeddings=32)),
    "head_dim_32": tiny_args(head_dim=32),
    "no_chunk": tiny_args(attention_chunk_size=None),
}
