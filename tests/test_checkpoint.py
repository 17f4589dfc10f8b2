"""Checkpoint remapping: round trips, independent layout checks, strictness, laziness, array types."""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping
from types import SimpleNamespace

import numpy as np
import pytest
from tiny import CONFIGS, random_weights

from common.array_ops import LazyDict
from common.checkpoint import (
    CheckpointError,
    canonical_to_hf,
    canonical_to_meta,
    check_keys,
    checked_items,
    detect_layout,
    hf_to_canonical,
    meta_shards_to_canonical,
    meta_to_canonical,
    shard_axis,
    split_vision,
)
from common.names import canonical_shapes

ROUND_TRIP_CONFIGS = ["dense_moe", "all_moe", "head_dim_32"]
ARGS = CONFIGS["dense_moe"]  # layers 0, 2 dense; 1, 3 MoE; H=4, K=2, d=16, D=64, E=4, F=48, Fm=96


@pytest.fixture(scope="module")
def weights() -> dict[str, np.ndarray]:
    return random_weights(ARGS, seed=1)


def to_numpy(x: object) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        return x.numpy()  # type: ignore[attr-defined]
    return np.asarray(x)


def assert_same(got: Mapping[str, object], want: Mapping[str, np.ndarray]) -> None:
    assert list(got) == list(want)
    for name, x in want.items():
        y = to_numpy(got[name])
        assert y.shape == x.shape, name
        assert np.array_equal(y, x), name


class Counting(Mapping):
    """A source mapping that records which values were read."""

    def __init__(self, data: Mapping[str, object]) -> None:
        self.data, self.reads = dict(data), []

    def __getitem__(self, key: str) -> object:
        self.reads.append(key)
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)


# --- round trips and idempotency -------------------------------------------------------------


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("stacked", [False, True])
def test_hf_round_trip(config: str, conditional: bool, stacked: bool) -> None:
    args = CONFIGS[config]
    sd = random_weights(args, seed=2)
    hf = dict(canonical_to_hf(sd, args, conditional=conditional, stacked_experts=stacked))
    assert all(k.startswith("language_model.") == conditional for k in hf)
    assert detect_layout(hf) == "hf"
    back = hf_to_canonical(hf, args)
    assert_same(back, sd)
    assert_same(hf_to_canonical(back, args), sd)  # idempotent on canonical keys


@pytest.mark.parametrize("config", ROUND_TRIP_CONFIGS)
@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_round_trip(config: str, n_shards: int) -> None:
    args = CONFIGS[config]
    sd = random_weights(args, seed=3)
    shards = canonical_to_meta(sd, args, n_shards=n_shards, extras=True)
    assert len(shards) == n_shards and detect_layout(shards[0]) == "meta"
    assert_same(meta_shards_to_canonical(shards, args), sd)
    if n_shards == 1:
        assert_same(meta_to_canonical(shards[0], args), sd)


def test_canonical_is_idempotent(weights: dict[str, np.ndarray]) -> None:
    assert detect_layout(weights) == "canonical"
    assert_same(hf_to_canonical(weights, ARGS), weights)
    assert_same(meta_to_canonical(weights, ARGS), weights)
    # canonical pieces of model-parallel shards merge like Meta ones
    halves = [{k: v for k, v in weights.items()} for _ in range(2)]
    for r, half in enumerate(halves):
        for name in list(half):
            axis = shard_axis(name)
            if axis is not None:
                half[name] = np.split(weights[name], 2, axis=axis)[r]
    assert_same(meta_shards_to_canonical(halves, ARGS), weights)


# --- HF layout, checked independently -----------------------------------------------------------


def test_hf_expert_layout_by_hand(weights: dict[str, np.ndarray]) -> None:
    E, F, D = 4, 48, 64
    gate, up = weights["layers.1.feed_forward.experts.w_gate"], weights["layers.1.feed_forward.experts.w_value"]
    down = weights["layers.1.feed_forward.experts.w_out"]
    gate_up = np.concatenate([gate.transpose(0, 2, 1), up.transpose(0, 2, 1)], axis=-1)  # [E, D, 2F]
    hf = dict(canonical_to_hf(weights, ARGS))
    assert hf["model.layers.1.feed_forward.experts.gate_up_proj"].shape == (E, D, 2 * F)
    assert np.array_equal(hf["model.layers.1.feed_forward.experts.gate_up_proj"], gate_up)
    assert np.array_equal(hf["model.layers.1.feed_forward.experts.down_proj"], down.transpose(0, 2, 1))
    # HF computes x @ gate_up_proj[e] and takes the first half as the gate
    x = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    np.testing.assert_allclose((x @ gate_up[2])[:F], gate[2] @ x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((x @ gate_up[2])[F:], up[2] @ x, rtol=1e-5, atol=1e-6)
    only = {"model.layers.1.feed_forward.experts.gate_up_proj": gate_up}
    got = hf_to_canonical(only, ARGS)
    assert np.array_equal(got["layers.1.feed_forward.experts.w_gate"], gate)
    assert np.array_equal(got["layers.1.feed_forward.experts.w_value"], up)


def test_hf_names_and_experts_match_transformers(weights: dict[str, np.ndarray]) -> None:
    torch = pytest.importorskip("torch")
    llama4 = pytest.importorskip("transformers.models.llama4.modeling_llama4")
    from transformers import Llama4TextConfig

    cfg = Llama4TextConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, intermediate_size=48, intermediate_size_mlp=96, num_local_experts=4,
                           moe_layers=[1, 3], interleave_moe_layer_step=2, vocab_size=128, hidden_act="silu")
    with torch.device("meta"):
        reference = llama4.Llama4ForCausalLM(cfg).state_dict()
    hf = dict(canonical_to_hf(weights, ARGS))
    assert {k: tuple(v.shape) for k, v in hf.items()} == {k: tuple(v.shape) for k, v in reference.items()}

    experts = llama4.Llama4TextExperts(cfg)
    experts.load_state_dict({"gate_up_proj": torch.from_numpy(hf["model.layers.3.feed_forward.experts.gate_up_proj"]),
                             "down_proj": torch.from_numpy(hf["model.layers.3.feed_forward.experts.down_proj"])})
    x = np.random.default_rng(1).standard_normal((4, 3, 64)).astype(np.float32)  # [E, T, D]
    with torch.no_grad():
        got = experts(torch.from_numpy(x.reshape(12, 64))).numpy().reshape(4, 3, 64)
    ff = "layers.3.feed_forward.experts."
    g = np.einsum("etd,efd->etf", x, weights[ff + "w_gate"])
    v = np.einsum("etd,efd->etf", x, weights[ff + "w_value"])
    want = np.einsum("etf,edf->etd", g / (1 + np.exp(-g)) * v, weights[ff + "w_out"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_conditional_generation_and_vision_left_aside(weights: dict[str, np.ndarray]) -> None:
    hf = dict(canonical_to_hf(weights, ARGS, conditional=True))
    assert "language_model.lm_head.weight" in hf and "language_model.model.norm.weight" in hf
    vision = {"vision_model.patch_embedding.linear.weight": np.ones((8, 4), np.float32),
              "vision_model.model.layers.0.self_attn.q_proj.bias": np.ones(8, np.float32),
              "multi_modal_projector.linear_1.weight": np.ones((64, 8), np.float32)}
    both = {**hf, **vision}
    assert_same(hf_to_canonical(both, ARGS), weights)
    text, image = split_vision(both)
    assert list(image) == list(vision) and list(text) == list(hf)
    meta = canonical_to_meta(weights, ARGS)[0]
    meta["vision_projection.weight"] = np.ones((64, 8), np.float32)
    meta["vision_embeddings.vision_encoder.class_embedding"] = np.ones(8, np.float32)
    assert_same(meta_to_canonical(meta, ARGS), weights)


def test_per_expert_and_mlx_stacked_forms(weights: dict[str, np.ndarray]) -> None:
    hf = dict(canonical_to_hf(weights, ARGS))
    per_expert, stacked = dict(hf), dict(hf)
    for i in (1, 3):
        p, ff = f"model.layers.{i}.feed_forward.experts.", f"layers.{i}.feed_forward.experts."
        for d in (per_expert, stacked):
            del d[p + "gate_up_proj"], d[p + "down_proj"]
        for hf_name, canon in (("gate_proj", "w_gate"), ("up_proj", "w_value"), ("down_proj", "w_out")):
            stacked[f"{p}{hf_name}.weight"] = weights[ff + canon]
            for e in (3, 0, 2, 1):  # order of keys must not matter
                per_expert[f"{p}{e}.{hf_name}.weight"] = weights[ff + canon][e]  # [out, in]
    assert_same(hf_to_canonical(per_expert, ARGS), weights)
    assert_same(hf_to_canonical(stacked, ARGS), weights)
    incomplete = {k: v for k, v in per_expert.items() if k != "model.layers.1.feed_forward.experts.2.up_proj.weight"}
    with pytest.raises(CheckpointError, match=r"layers\.1\.feed_forward\.experts\.w_value.*\[0, 1, 3\]"):
        hf_to_canonical(incomplete, ARGS)


def test_stacked_form_matches_mlx_lm_sanitize(weights: dict[str, np.ndarray]) -> None:
    mx = pytest.importorskip("mlx.core")
    llama4 = pytest.importorskip("mlx_lm.models.llama4")
    fused = {k: mx.array(v) for k, v in canonical_to_hf(weights, ARGS, conditional=True).items()}
    model = SimpleNamespace(args=SimpleNamespace(text_config=SimpleNamespace(num_hidden_layers=4)))
    theirs = llama4.Model.sanitize(model, fused)
    ours = dict(canonical_to_hf(weights, ARGS, conditional=True, stacked_experts=True))
    assert sorted(theirs) == sorted(ours)
    for k, v in ours.items():
        assert np.array_equal(np.array(theirs[k]), v), k


# --- Meta layout, checked independently ----------------------------------------------------------


def meta_by_hand(w: dict[str, np.ndarray], n: int, r: int) -> dict[str, np.ndarray]:
    """Rank r of n as §4.1 of the reference describes it, written out without the library."""
    def rows(x: np.ndarray) -> np.ndarray:
        return np.split(x, n, axis=0)[r]

    def cols(x: np.ndarray, axis: int = 1) -> np.ndarray:
        return np.split(x, n, axis=axis)[r]

    out = {"tok_embeddings.weight": rows(w["tok_embeddings.weight"]), "norm.weight": w["norm.weight"],
           "output.weight": rows(w["output.weight"])}
    for i in range(4):
        p, m = f"layers.{i}.", f"layers.{i}.feed_forward."
        out[p + "attention.wqkv.weight"] = np.concatenate([rows(w[p + f"attention.w{c}.weight"]) for c in "qkv"])
        out[p + "attention.wqkv.layer_norm_weight"] = w[p + "attention_norm.weight"]
        out[p + "attention.wo.weight"] = cols(w[p + "attention.wo.weight"])
        if i in (0, 2):
            out[m + "mlp.fc1_weight"] = np.concatenate([rows(w[m + "w_gate.weight"]), rows(w[m + "w_value.weight"])])
            out[m + "mlp.fc2_weight"] = cols(w[m + "w_out.weight"])
            out[m + "mlp.layer_norm_weight"] = w[p + "ffn_norm.weight"]
            continue
        out[m + "norm.weight"] = w[p + "ffn_norm.weight"]
        out[m + "router_DE"] = w[m + "router.weight"].T
        out[m + "w_in_shared_FD.weight"] = rows(w[m + "shared_expert.w_gate.weight"])
        out[m + "w_swiglu_FD.weight"] = rows(w[m + "shared_expert.w_value.weight"])
        out[m + "w_out_shared_DF.weight"] = cols(w[m + "shared_expert.w_out.weight"])
        w1 = w[m + "experts.w_gate"].transpose(0, 2, 1)  # Meta's experts.w1 [E, D, F]
        w3 = w[m + "experts.w_value"].transpose(0, 2, 1)
        w2 = w[m + "experts.w_out"].transpose(0, 2, 1)  # [E, F, D]
        out[m + "experts.moe_w_in_eD_F"] = cols(w1, 2).reshape(4 * 64, -1)
        out[m + "experts.moe_w_swiglu_eD_F"] = cols(w3, 2).reshape(4 * 64, -1)
        out[m + "experts.moe_w_out_eF_D"] = cols(w2, 1).reshape(-1, 64)
    return out


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_meta_layout_by_hand(weights: dict[str, np.ndarray], n_shards: int) -> None:
    ours = canonical_to_meta(weights, ARGS, n_shards=n_shards)
    for r in range(n_shards):
        want = meta_by_hand(weights, n_shards, r)
        assert sorted(ours[r]) == sorted(want)
        for k, v in want.items():
            assert np.array_equal(ours[r][k], v), (r, k)
    hand = [meta_by_hand(weights, n_shards, r) for r in range(n_shards)]
    assert_same(meta_shards_to_canonical(hand, ARGS), weights)
    assert ours[0]["layers.1.feed_forward.experts.moe_w_out_eF_D"].shape == (4 * 48 // n_shards, 64)
    assert ours[0]["layers.0.attention.wqkv.weight"].shape == ((4 + 2 * 2) * 16 // n_shards, 64)


def test_unfused_meta_names(weights: dict[str, np.ndarray]) -> None:
    meta = {}
    for name, x in weights.items():
        name = name.replace("w_gate.weight", "w1.weight").replace("w_value.weight", "w3.weight")
        name = name.replace("w_out.weight", "w2.weight").replace("router.weight", "router_DE")
        name = name.replace("experts.w_gate", "experts.w1").replace("experts.w_value", "experts.w3")
        name = name.replace("experts.w_out", "experts.w2")
        meta[name] = x.T if name.endswith("router_DE") else x.transpose(0, 2, 1) if x.ndim == 3 else x
    assert "layers.1.feed_forward.shared_expert.w1.weight" in meta
    assert detect_layout(meta) == "meta"
    assert_same(meta_to_canonical(meta, ARGS), weights)


def test_naive_shard_concatenation_is_wrong(weights: dict[str, np.ndarray]) -> None:
    shards = canonical_to_meta(weights, ARGS, n_shards=2)
    naive = {}
    for k in shards[0]:
        axis = 1 if k.endswith(("wo.weight", "fc2_weight", "_DF.weight", "moe_w_in_eD_F", "moe_w_swiglu_eD_F")) else 0
        naive[k] = shards[0][k] if k.endswith(("norm_weight", "norm.weight", "router_DE")) else \
            np.concatenate([s[k] for s in shards], axis=axis)
    wrong = meta_to_canonical(naive, ARGS)
    for name in ("layers.0.attention.wq.weight", "layers.0.attention.wk.weight", "layers.0.feed_forward.w_gate.weight",
                 "layers.1.feed_forward.experts.w_out"):
        assert wrong[name].shape == weights[name].shape
        assert not np.array_equal(wrong[name], weights[name]), name
    assert_same(meta_shards_to_canonical(shards, ARGS), weights)


def test_drop_list(weights: dict[str, np.ndarray]) -> None:
    sd = canonical_to_meta(weights, ARGS, extras=True)[0]
    sd["layers.0.attention.wo._extra_state"] = io.BytesIO(b"")
    sd["freq_cis"] = np.ones(8, np.float32)
    sd["layers.0.something_pickled"] = io.BytesIO(b"")  # not an array: dropped whatever its name
    ff = "layers.1.feed_forward."
    for key in ("rope.freqs", ff + "global_gate_stats_3E", ff + "running_gate_stats_3E", ff + "expert_activation_DE",
                "layers.2.attention.wqkv._extra_state"):
        assert key in sd
    assert_same(meta_to_canonical(sd, ARGS), weights)


# --- strictness and error messages ------------------------------------------------------------------


def test_unknown_keys_are_listed(weights: dict[str, np.ndarray]) -> None:
    hf = dict(canonical_to_hf(weights, ARGS))
    hf["model.layers.0.self_attn.q_norm.weight"] = np.ones(16, np.float32)
    hf["model.extra.weight"] = np.ones(4, np.float32)
    with pytest.raises(CheckpointError, match="hf layout") as e:
        hf_to_canonical(hf, ARGS)
    assert "model.layers.0.self_attn.q_norm.weight" in str(e.value) and "model.extra.weight" in str(e.value)
    meta = canonical_to_meta(weights, ARGS)[0]
    meta["layers.0.attention.wqkv.bias"] = np.ones(8, np.float32)
    with pytest.raises(CheckpointError, match=r"meta layout: layers\.0\.attention\.wqkv\.bias"):
        meta_to_canonical(meta, ARGS)
    with pytest.raises(CheckpointError, match=r"hf layout: .*wqkv"):
        hf_to_canonical(canonical_to_meta(weights, ARGS)[0], ARGS)
    with pytest.raises(CheckpointError, match=r"not canonical names: model\.norm\.weight"):
        canonical_to_hf({"model.norm.weight": weights["norm.weight"]}, ARGS)


def test_missing_and_unexpected_keys(weights: dict[str, np.ndarray]) -> None:
    sd = {k: v for k, v in weights.items() if k not in ("norm.weight", "layers.3.feed_forward.router.weight")}
    sd["layers.4.attention.wq.weight"] = weights["layers.0.attention.wq.weight"]
    with pytest.raises(CheckpointError) as e:
        check_keys(sd, ARGS)
    msg = str(e.value)
    assert "missing 2 key(s): layers.3.feed_forward.router.weight, norm.weight" in msg
    assert "1 unexpected key(s): layers.4.attention.wq.weight" in msg
    with pytest.raises(CheckpointError, match="missing"):
        next(checked_items(hf_to_canonical({k: v for k, v in sd.items() if k[:8] != "layers.4"}, ARGS), ARGS))
    check_keys({**weights, "vision_projection.weight": np.ones((64, 8))}, ARGS)  # vision is not text


def test_wrong_shapes_name_the_key(weights: dict[str, np.ndarray]) -> None:
    sd = dict(weights)
    sd["layers.2.attention.wk.weight"] = np.zeros((16, 64), np.float32)
    items = checked_items(sd, ARGS)
    with pytest.raises(CheckpointError, match=r"layers\.2\.attention\.wk\.weight: expected shape \(32, 64\), "
                                              r"found \(16, 64\)"):
        list(items)
    meta = canonical_to_meta(weights, ARGS)[0]
    meta["layers.0.attention.wqkv.weight"] = np.zeros((127, 64), np.float32)
    meta["layers.2.feed_forward.mlp.fc1_weight"] = np.zeros((191, 64), np.float32)
    meta["layers.1.feed_forward.experts.moe_w_in_eD_F"] = np.zeros((4 * 63, 48), np.float32)
    got = meta_to_canonical(meta, ARGS)
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wqkv\.weight: shape \(127, 64\).*4:2:2"):
        got["layers.0.attention.wk.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.2\.feed_forward\.mlp\.fc1_weight: shape \(191, 64\)"):
        got["layers.2.feed_forward.w_value.weight"]
    with pytest.raises(CheckpointError, match=r"moe_w_in_eD_F: expected \[4\*64, F\].*found shape \(252, 48\)"):
        got["layers.1.feed_forward.experts.w_gate"]
    hf = {"model.layers.1.feed_forward.experts.gate_up_proj": np.zeros((4, 64, 95), np.float32)}
    with pytest.raises(CheckpointError, match=r"gate_up_proj: expected \[E, D, 2F\].*\(4, 64, 95\)"):
        hf_to_canonical(hf, ARGS)["layers.1.feed_forward.experts.w_gate"]


def test_conflicts_between_keys(weights: dict[str, np.ndarray]) -> None:
    meta = canonical_to_meta(weights, ARGS)[0]
    meta["layers.0.attention.wq.weight"] = weights["layers.0.attention.wq.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.0\.attention\.wq\.weight is given by several keys"):
        meta_to_canonical(meta, ARGS)
    shards = canonical_to_meta(weights, ARGS, n_shards=2)
    del shards[1]["layers.2.attention.wo.weight"]
    with pytest.raises(CheckpointError, match=r"shards 0 and 1 hold different tensors: layers\.2\.attention\.wo"):
        meta_shards_to_canonical(shards, ARGS)
    with pytest.raises(CheckpointError, match="no Meta checkpoint shards"):
        meta_shards_to_canonical([], ARGS)
    with pytest.raises(CheckpointError, match="layout is unknown"):
        shard_axis("layers.0.attention.wqkv.weight")


def test_detect_layout() -> None:
    assert detect_layout(["language_model.model.norm.weight", "vision_model.x"]) == "hf"
    assert detect_layout(["lm_head.weight"]) == "hf"
    assert detect_layout(["layers.0.feed_forward.experts.moe_w_out_eF_D", "norm.weight"]) == "meta"
    assert detect_layout(["rope.freqs", "tok_embeddings.weight"]) == "meta"
    assert detect_layout(["layers.0.feed_forward.experts.w_out", "output.weight"]) == "canonical"
    with pytest.raises(CheckpointError, match="mixed layouts"):
        detect_layout(["model.norm.weight", "layers.0.attention.wqkv.weight"])


# --- laziness and array libraries -------------------------------------------------------------------


def test_lazy_and_not_memoised(weights: dict[str, np.ndarray]) -> None:
    source = Counting(canonical_to_hf(weights, ARGS))
    lazy = hf_to_canonical(source, ARGS)
    assert isinstance(lazy, LazyDict) and source.reads == []
    assert "layers.1.feed_forward.experts.w_gate" in lazy and source.reads == []
    lazy["layers.1.feed_forward.experts.w_gate"]
    lazy["layers.1.feed_forward.experts.w_gate"]
    assert source.reads == ["model.layers.1.feed_forward.experts.gate_up_proj"] * 2
    shards = [Counting(s) for s in canonical_to_meta(weights, ARGS, n_shards=2, extras=True)]
    merged = meta_shards_to_canonical(shards, ARGS)
    assert all(s.reads == [] for s in shards)
    merged["layers.0.attention.wv.weight"]
    assert [s.reads for s in shards] == [["layers.0.attention.wqkv.weight"]] * 2


def test_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    args = CONFIGS["all_moe"]
    sd = random_weights(args, seed=4)
    for shards in (canonical_to_meta(sd, args, n_shards=2, extras=True), [dict(canonical_to_hf(sd, args))]):
        tensors = [{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in s.items()}
                   for s in shards]
        got = meta_shards_to_canonical(tensors, args) if len(tensors) == 2 else hf_to_canonical(tensors[0], args)
        assert all(isinstance(v, torch.Tensor) for _, v in checked_items(got, args))
        assert_same(got, sd)
    back = canonical_to_hf({k: torch.from_numpy(v) for k, v in sd.items()}, args)
    assert_same(hf_to_canonical(back, args), sd)


def test_mlx_arrays() -> None:
    mx = pytest.importorskip("mlx.core")
    args = CONFIGS["dense_moe"]
    sd = random_weights(args, seed=5)
    shards = [{k: mx.array(v) if isinstance(v, np.ndarray) else v for k, v in s.items()}
              for s in canonical_to_meta(sd, args, n_shards=2, extras=True)]
    got = meta_shards_to_canonical(shards, args)
    assert all(isinstance(v, mx.array) for _, v in checked_items(got, args))
    assert_same({k: np.array(v) for k, v in got.items()}, sd)
    hf = canonical_to_hf({k: mx.array(v) for k, v in sd.items()}, args, conditional=True)
    assert_same({k: np.array(v) for k, v in hf_to_canonical(dict(hf), args).items()}, sd)


def test_canonical_shapes_cover_every_output(weights: dict[str, np.ndarray]) -> None:
    assert list(hf_to_canonical(canonical_to_hf(weights, ARGS), ARGS)) == list(canonical_shapes(ARGS))


def test_written_layouts_are_contiguous(weights: dict[str, np.ndarray]) -> None:
    # safetensors' numpy writer stores raw memory, so a transposed view would be written scrambled
    for sd in (dict(canonical_to_hf(weights, ARGS)), *canonical_to_meta(weights, ARGS, n_shards=2)):
        assert all(v.flags.c_contiguous for v in sd.values())
