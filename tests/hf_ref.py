"""Hugging Face transformers' Llama4ForCausalLM as an independent reference for the tiny configs.

The canonical -> HF weight mapping here is written separately from common.checkpoint on purpose,
so a mistake in the library's mapping cannot hide in both the model and its reference.
"""

from __future__ import annotations

import numpy as np
import torch

from common.args import ModelArgs
from common.hf_config import to_hf_text_config

_LAYER = {  # canonical suffix -> HF suffix, for nn.Linear-layout tensors copied as they are
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w_gate.weight": "feed_forward.gate_proj.weight",
    "feed_forward.w_value.weight": "feed_forward.up_proj.weight",
    "feed_forward.w_out.weight": "feed_forward.down_proj.weight",
    "feed_forward.router.weight": "feed_forward.router.weight",
    "feed_forward.shared_expert.w_gate.weight": "feed_forward.shared_expert.gate_proj.weight",
    "feed_forward.shared_expert.w_value.weight": "feed_forward.shared_expert.up_proj.weight",
    "feed_forward.shared_expert.w_out.weight": "feed_forward.shared_expert.down_proj.weight",
}


def hf_state_dict(args: ModelArgs, weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Canonical weights -> Llama4ForCausalLM state dict (experts input-major, gate|up fused)."""
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}
    out = {"model.embed_tokens.weight": t["tok_embeddings.weight"], "model.norm.weight": t["norm.weight"],
           "lm_head.weight": t["output.weight"]}
    for i in range(args.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        out.update({dst + hf: t[src + ours] for ours, hf in _LAYER.items() if src + ours in t})
        if f"{src}feed_forward.experts.w_gate" in t:
            gate = t[f"{src}feed_forward.experts.w_gate"].transpose(1, 2)  # [E, F, D] -> [E, D, F]
            up = t[f"{src}feed_forward.experts.w_value"].transpose(1, 2)  # [E, F, D] -> [E, D, F]
            out[dst + "feed_forward.experts.gate_up_proj"] = torch.cat([gate, up], dim=2)  # [E, D, 2F]
            down = t[f"{src}feed_forward.experts.w_out"].transpose(1, 2)  # [E, D, F] -> [E, F, D]
            out[dst + "feed_forward.experts.down_proj"] = down.contiguous()
    return out


def hf_config(args: ModelArgs):
    from transformers import Llama4TextConfig

    cfg = to_hf_text_config(args)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    return Llama4TextConfig(**cfg, attn_implementation="eager")


def hf_model(args: ModelArgs, weights: dict[str, np.ndarray]):
    """A float32 Llama4ForCausalLM (eager attention) holding the canonical `weights`."""
    from transformers import Llama4ForCausalLM

    torch.manual_seed(0)  # the random init is overwritten; seeded only to keep runs identical
    model = Llama4ForCausalLM(hf_config(args)).float().eval()
    model.load_state_dict(hf_state_dict(args, weights), strict=True)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    """Float32 logits [B, L, V] of one full forward over int tokens [B, L]."""
    with torch.inference_mode():
        out = model(input_ids=torch.from_numpy(np.asarray(tokens, dtype=np.int64)), use_cache=False)
    return out.logits.float().numpy()


def hf_greedy(model, tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """HF `generate` (greedy, with its own cache): the new tokens [B, max_new_tokens]."""
    ids = torch.from_numpy(np.asarray(tokens, dtype=np.int64))
    # generate() refills a None eos from the generation config; an empty list means "never stop".
    model.generation_config.eos_token_id = []
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1] :].numpy()
