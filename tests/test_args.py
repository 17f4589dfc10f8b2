"""Configuration parsing (Meta params.json, HF config.json) and the shared RoPE numerics."""

from __future__ import annotations

import numpy as np
import pytest

from common.args import ModelArgs, RopeScaling
from common.hf_config import to_hf_text_config
from common.rope import attention_mask, rope_inv_freqs, temperature_scales

SCOUT_PARAMS = {
    "dim": 5120, "n_layers": 48, "n_heads": 40, "n_kv_heads": 8, "vocab_size": 202048, "multiple_of": 2048,
    "ffn_dim_multiplier": 1.2, "ffn_exp": 4.0, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
    "nope_layer_interval": 4, "attention_chunk_size": 8192, "use_qk_norm": True,
    "moe_args": {"num_experts": 16, "top_k": 1, "interleave_moe_layer_step": 1, "capacity_factor": 1.0,
                 "auto_scale_F": True},
    "vision_args": {"image_size": {"height": 336, "width": 336}, "patch_size": {"height": 14, "width": 14},
                    "dim": 1408, "n_layers": 34, "n_heads": 16, "mlp_ratio": 4.0, "output_dim": 4096,
                    "pixel_shuffle_ratio": 0.5},
    "some_future_key": "ignored",
}


def test_scout_params() -> None:
    a = ModelArgs.from_params(SCOUT_PARAMS)
    assert (a.head_dim, a.moe_hidden_dim, a.num_experts) == (128, 8192, 16)
    assert a.rope_scaling == RopeScaling(16.0, 1.0, 1.0, 8192)
    assert [i for i, r in enumerate(a.layer_roles) if not r.use_rope] == list(range(3, 48, 4))
    assert all(r.moe for r in a.layer_roles)
    assert not any(r.qk_norm for r in a.layer_roles if not r.use_rope)
    assert a.vision_args is not None and a.vision_args.tokens_per_tile == 144


def test_maverick_params() -> None:
    p = dict(SCOUT_PARAMS, use_scaled_rope=False, use_qk_norm=False,
             moe_args={"num_experts": 128, "top_k": 1, "interleave_moe_layer_step": 2})
    a = ModelArgs.from_params(p)
    assert a.ffn_hidden_dim == 16384 and a.moe_hidden_dim == 8192 and a.rope_scaling is None
    assert a.moe_layers == tuple(range(1, 48, 2))
    assert not any(r.qk_norm for r in a.layer_roles)


def test_reference_dense_width() -> None:
    # A run of the reference gives 208 for dim 64, multiplier 1.2, multiple_of 16.
    a = ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 10,
                               "ffn_dim_multiplier": 1.2, "multiple_of": 16})
    assert a.ffn_hidden_dim == 208


@pytest.mark.parametrize("drop, field", [("n_kv_heads", "n_kv_heads"), ("ffn_exp", "ffn_exp"),
                                         ("ffn_dim_multiplier", "ffn_dim_multiplier"), ("dim", "dim")])
def test_params_missing_fields(drop: str, field: str) -> None:
    p = {k: v for k, v in SCOUT_PARAMS.items() if k != drop}
    with pytest.raises(ValueError, match=f"'{field}'"):
        ModelArgs.from_params(p)


def test_inconsistent_params() -> None:
    with pytest.raises(ValueError, match="'n_kv_heads'"):
        ModelArgs.from_params(dict(SCOUT_PARAMS, n_kv_heads=7))


def _real_hf_config() -> dict:
    text = {
        "model_type": "llama4_text", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 100, "intermediate_size": 48,
        "intermediate_size_mlp": 96, "rope_theta": 500000.0, "attn_temperature_tuning": 4,
        "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192},
        "no_rope_layers": [1, 1, 1, 0], "interleave_moe_layer_step": 2, "num_local_experts": 8,
        "attention_chunk_size": 8192, "use_qk_norm": True,
    }
    return {"model_type": "llama4", "text_config": text, "vision_config": {"hidden_size": 1408}}


def test_hf_config_release_format() -> None:
    a = ModelArgs.from_hf_config(_real_hf_config())
    assert a.head_dim == 32 and a.attn_temperature_tuning is True
    assert a.moe_layers == (1, 3) and a.ffn_hidden_dim == 96 and a.moe_hidden_dim == 48
    assert [r.use_rope for r in a.layer_roles] == [True, True, True, False]
    assert a.rope_scaling == RopeScaling(16.0, 1.0, 1.0, 8192)
    assert a.vision_args is not None


def test_hf_config_transformers5_format_round_trip() -> None:
    a = ModelArgs.from_hf_config(_real_hf_config())
    c = to_hf_text_config(a)
    c["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 16.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}
    del c["rope_scaling"], c["rope_theta"]
    b = ModelArgs.from_hf_config(c)
    assert b.layer_roles == a.layer_roles and b.rope_scaling == a.rope_scaling and b.rope_theta == a.rope_theta


@pytest.mark.parametrize("config, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"model_type": "llama4"}, "text_config"),
    ({"model_type": "llama4_text", "hidden_size": 8}, "num_hidden_layers"),
])
def test_hf_config_errors(config: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelArgs.from_hf_config(config)


def test_hf_config_bad_no_rope_layers() -> None:
    c = _real_hf_config()
    c["text_config"]["no_rope_layers"] = [1, 0]
    with pytest.raises(ValueError, match="no_rope_layers"):
        ModelArgs.from_hf_config(c)


@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 8192), RopeScaling(16.0, 1.0, 1.0, 8192),
                                     RopeScaling(8.0, 1.0, 4.0, 64)])
def test_rope_frequencies_match_transformers(scaling: RopeScaling | None) -> None:
    torch = pytest.importorskip("torch")
    from transformers import Llama4TextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", "rope_theta": 500000.0}
    if scaling is not None:
        params = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": scaling.factor,
                  "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
                  "original_max_position_embeddings": scaling.original_max_position_embeddings}
    config = Llama4TextConfig(hidden_size=5120, num_attention_heads=40, head_dim=128, rope_parameters=params)
    ours = rope_inv_freqs(128, 500000.0, scaling)
    assert not np.isnan(ours).any()
    if scaling is None:
        theirs = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float) / 128))
    else:
        theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)


def test_scout_rope_bands() -> None:
    base = rope_inv_freqs(128, 500000.0)
    scaled = rope_inv_freqs(128, 500000.0, RopeScaling(16.0, 1.0, 1.0, 8192))
    divided = np.flatnonzero(~np.isclose(base, scaled))
    assert list(divided) == list(range(35, 64))  # 29 of the 64, as a run of the reference shows
    np.testing.assert_allclose(scaled[35:], base[35:] / 16, rtol=1e-6)


def test_temperature_scales() -> None:
    s = temperature_scales(0, 12, floor_scale=4.0, attn_scale=0.5)
    expected = [1 + 0.5 * np.log(1 + np.floor((p + 1) / 4)) for p in range(12)]
    np.testing.assert_allclose(s, expected, rtol=1e-6)
    assert s[2] == 1.0 and s[3] > 1.0  # p + 1: the first scaled position is 3
    assert (temperature_scales(0, 8191, 8192.0, 0.1) == 1.0).all()


def test_chunked_mask() -> None:
    m = attention_mask(q_start=6, q_len=4, k_start=0, k_len=10, chunk=4)
    for qi, q in enumerate(range(6, 10)):
        for k in range(10):
            assert m[qi, k] == (k <= q and k // 4 == q // 4)
    g = attention_mask(6, 4, 0, 10, None)
    assert g.sum() == 7 + 8 + 9 + 10


def test_hf_config_rejects_non_affine_quantization() -> None:
    c = _real_hf_config() | {"quantization": {"group_size": 32, "bits": 4, "mode": "mxfp4"}}
    with pytest.raises(ValueError, match="quantization.mode"):
        ModelArgs.from_hf_config(c)
    assert ModelArgs.from_hf_config(c | {"quantization": {"group_size": 32, "bits": 4}}).quantization.bits == 4
