"""The Llama 4 image encoder in MLX: a ViT with 2-D RoPE, then pixel shuffle and an MLP adapter.

Module names are Meta's, so the parameters carry the canonical vision names.
Shapes: N tiles, G patch grid side, S = G*G + 1 tokens (patches, then CLS), W encoder width,
H heads, d head dim, p patch side, O adapter output dim.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from common.args import VisionArgs
from common.rope import vision_rope_cos_sin


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate adjacent pairs of x [N, S, H, d] by per-token angles (cos, sin [S, d/2]); fp32 math."""
    N, S, H, d = x.shape
    pairs = x.astype(mx.float32).reshape(N, S, H, d // 2, 2)  # [N, S, H, d/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]  # each [N, S, H, d/2]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [S, 1, d/2], broadcast over N and heads
    out = mx.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)  # [N, S, H, d/2, 2]
    return out.reshape(N, S, H, d).astype(x.dtype)


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2-D RoPE."""

    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = v.n_heads, v.head_dim
        self.wq = nn.Linear(v.dim, v.dim, bias=True)
        self.wk = nn.Linear(v.dim, v.dim, bias=True)
        self.wv = nn.Linear(v.dim, v.dim, bias=True)
        self.wo = nn.Linear(v.dim, v.dim, bias=True)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        N, S, _ = x.shape
        q = apply_rope(self.wq(x).reshape(N, S, self.n_heads, -1), *rope)  # [N, S, H, d]
        k = apply_rope(self.wk(x).reshape(N, S, self.n_heads, -1), *rope)  # [N, S, H, d]
        v = self.wv(x).reshape(N, S, self.n_heads, -1)  # [N, S, H, d]
        out = mx.fast.scaled_dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                                   v.transpose(0, 2, 1, 3), scale=self.head_dim**-0.5)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(N, S, -1))  # [N, H, S, d] -> [N, S, H*d]


class MLP(nn.Module):
    """c_proj(GELU(c_fc(x))), exact (erf) GELU; `gelu_out` adds a GELU after c_proj (the adapter)."""

    def __init__(self, dim: int, hidden: int, out: int, bias: bool, gelu_out: bool = False) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, out, bias=bias)
        self.gelu_out = gelu_out

    def __call__(self, x: mx.array) -> mx.array:
        y = self.c_proj(nn.gelu(self.c_fc(x)))
        return nn.gelu(y) if self.gelu_out else y


class VisionBlock(nn.Module):
    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.attn = VisionAttention(v)
        self.ln_2 = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.mlp = MLP(v.dim, v.hidden_dim, v.dim, bias=True)

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.resblocks = [VisionBlock(v) for _ in range(v.n_layers)]

    def __call__(self, x: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
        for block in self.resblocks:
            x = block(x, rope)
        return x


class VisionEncoder(nn.Module):
    """Patches -> linear embedding, CLS appended last, learned positions, ViT; CLS dropped at the end."""

    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.args = v
        # Meta's weight name conv1._linear: MLX skips attributes that start with "_", but not dict keys.
        self.conv1 = {"_linear": nn.Linear(3 * v.patch_size**2, v.dim, bias=False)}
        self.class_embedding = mx.zeros((v.dim,))
        self.positional_embedding_vlm = mx.zeros((v.grid**2 + 1, v.dim))
        self.ln_pre = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.ln_post = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.transformer = VisionTransformer(v)
        # float32 tables; the leading underscore keeps them out of the parameters (and set_dtype)
        self._rope = tuple(mx.array(t) for t in vision_rope_cos_sin(v.grid, v.head_dim, v.rope_theta))

    def patches(self, pixels: mx.array) -> mx.array:
        """[N, 3, G*p, G*p] -> [N, G*G, 3*p*p]: patches row-major, pixels in (channel, y, x) order."""
        N, p, G = pixels.shape[0], self.args.patch_size, self.args.grid
        x = pixels.reshape(N, 3, G, p, G, p)  # [N, 3, gy, p, gx, p]
        return x.transpose(0, 2, 4, 1, 3, 5).reshape(N, G * G, 3 * p * p)  # -> [N, gy, gx, 3, p, p] -> flat

    def __call__(self, pixels: mx.array) -> mx.array:
        x = self.conv1["_linear"](self.patches(pixels))  # [N, G*G, W]
        cls = mx.broadcast_to(self.class_embedding.astype(x.dtype), (x.shape[0], 1, x.shape[2]))  # [N, 1, W]
        x = mx.concatenate([x, cls], axis=1) + self.positional_embedding_vlm.astype(x.dtype)  # [N, S, W]
        x = self.transformer(self.ln_pre(x), self._rope)
        return self.ln_post(x)[:, :-1]  # [N, G*G, W]


def pixel_shuffle(x: mx.array, grid: int, factor: int) -> mx.array:
    """[N, G*G, C] -> [N, (G/f)^2, f*f*C]: out[n, i, j, (dy*f + dx)*C + c] = in[n, f*i + dy, f*j + dx, c]."""
    N, _, C = x.shape
    g = grid // factor
    x = x.reshape(N, g, factor, g, factor, C)  # [N, i, dy, j, dx, C]
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(N, g * g, factor * factor * C)  # -> [N, i, j, dy, dx, C] -> flat


class PixelShuffleMLP(nn.Module):
    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.grid, self.factor = v.grid, v.shuffle_factor
        self.mlp = MLP(v.adapter_dim, v.output_dim, v.output_dim, bias=False, gelu_out=True)

    def __call__(self, x: mx.array) -> mx.array:
        return self.mlp(pixel_shuffle(x, self.grid, self.factor))


class VisionEmbeddings(nn.Module):
    """Tiles [N, 3, H, W] -> image features [N, tokens_per_tile, output_dim] (before vision_projection)."""

    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.args = v
        self.vision_encoder = VisionEncoder(v)
        self.vision_adapter = PixelShuffleMLP(v)

    def __call__(self, pixels: mx.array) -> mx.array:
        size = self.args.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"vision_embeddings: expected pixels [N, 3, {size}, {size}], got {list(pixels.shape)}")
        dtype = self.vision_encoder.conv1["_linear"].weight.dtype
        return self.vision_adapter(self.vision_encoder(pixels.astype(dtype)))
