"""The Llama 4 image encoder in PyTorch: a ViT with 2-D RoPE, then pixel shuffle and an MLP adapter.

Module names are Meta's, so the parameters carry the canonical vision names.
Shapes: N tiles, G patch grid side, S = G*G + 1 tokens (patches, then CLS), W encoder width,
H heads, d head dim, p patch side, O adapter output dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.args import VisionArgs
from common.rope import vision_rope_cos_sin
from torch_backend.attention import apply_rope


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention with biases and 2-D RoPE."""

    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.n_heads, self.head_dim = v.n_heads, v.head_dim
        self.wq = nn.Linear(v.dim, v.dim, bias=True)
        self.wk = nn.Linear(v.dim, v.dim, bias=True)
        self.wv = nn.Linear(v.dim, v.dim, bias=True)
        self.wo = nn.Linear(v.dim, v.dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        N, S, _ = x.shape
        q = apply_rope(self.wq(x).view(N, S, self.n_heads, -1), *rope)  # [N, S, H, d]
        k = apply_rope(self.wk(x).view(N, S, self.n_heads, -1), *rope)  # [N, S, H, d]
        v = self.wv(x).view(N, S, self.n_heads, -1)  # [N, S, H, d]
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=self.head_dim**-0.5)  # [N, H, S, d]
        return self.wo(out.transpose(1, 2).reshape(N, S, -1))  # [N, H, S, d] -> [N, S, H*d]


class MLP(nn.Module):
    """c_proj(GELU(c_fc(x))), exact (erf) GELU; `gelu_out` adds a GELU after c_proj (the adapter)."""

    def __init__(self, dim: int, hidden: int, out: int, bias: bool, gelu_out: bool = False) -> None:
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, out, bias=bias)
        self.gelu_out = gelu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c_proj(F.gelu(self.c_fc(x)))
        return F.gelu(y) if self.gelu_out else y


class VisionBlock(nn.Module):
    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.attn = VisionAttention(v)
        self.ln_2 = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.mlp = MLP(v.dim, v.hidden_dim, v.dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope)
        return x + self.mlp(self.ln_2(x))


class VisionTransformer(nn.Module):
    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(v) for _ in range(v.n_layers))

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, rope)
        return x


class VisionEncoder(nn.Module):
    """Patches -> linear embedding, CLS appended last, learned positions, ViT; CLS dropped at the end."""

    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.args = v
        self.conv1 = nn.Module()  # Meta's unfold + linear patch embedding keeps its weight at conv1._linear
        self.conv1._linear = nn.Linear(3 * v.patch_size**2, v.dim, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(v.dim))
        self.positional_embedding_vlm = nn.Parameter(torch.zeros(v.grid**2 + 1, v.dim))
        self.ln_pre = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.ln_post = nn.LayerNorm(v.dim, eps=v.norm_eps)
        self.transformer = VisionTransformer(v)
        # float32 numpy, kept out of the state dict so casting the model never rounds the angles
        self.rope_table = vision_rope_cos_sin(v.grid, v.head_dim, v.rope_theta)

    def patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, G*p, G*p] -> [N, G*G, 3*p*p]: patches row-major, pixels in (channel, y, x) order."""
        N, p, G = pixels.shape[0], self.args.patch_size, self.args.grid
        x = pixels.reshape(N, 3, G, p, G, p)  # [N, 3, gy, p, gx, p]
        return x.permute(0, 2, 4, 1, 3, 5).reshape(N, G * G, 3 * p * p)  # -> [N, gy, gx, 3, p, p] -> [N, G*G, 3pp]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1._linear(self.patches(pixels))  # [N, G*G, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [N, 1, W]
        x = torch.cat([x, cls], dim=1) + self.positional_embedding_vlm.to(x.dtype)  # [N, S, W]
        cos, sin = (torch.from_numpy(t).to(x.device) for t in self.rope_table)  # each [S, d/2]
        x = self.transformer(self.ln_pre(x), (cos, sin))
        return self.ln_post(x)[:, :-1]  # [N, G*G, W]


def pixel_shuffle(x: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """[N, G*G, C] -> [N, (G/f)^2, f*f*C]: out[n, i, j, (dy*f + dx)*C + c] = in[n, f*i + dy, f*j + dx, c]."""
    N, _, C = x.shape
    g = grid // factor
    x = x.reshape(N, g, factor, g, factor, C)  # [N, i, dy, j, dx, C]
    return x.permute(0, 1, 3, 2, 4, 5).reshape(N, g * g, factor * factor * C)  # -> [N, i, j, dy, dx, C] -> flat


class PixelShuffleMLP(nn.Module):
    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.grid, self.factor = v.grid, v.shuffle_factor
        self.mlp = MLP(v.adapter_dim, v.output_dim, v.output_dim, bias=False, gelu_out=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(pixel_shuffle(x, self.grid, self.factor))


class VisionEmbeddings(nn.Module):
    """Tiles [N, 3, H, W] -> image features [N, tokens_per_tile, output_dim] (before vision_projection)."""

    def __init__(self, v: VisionArgs) -> None:
        super().__init__()
        self.args = v
        self.vision_encoder = VisionEncoder(v)
        self.vision_adapter = PixelShuffleMLP(v)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.args.image_size
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"vision_embeddings: expected pixels [N, 3, {size}, {size}], got {list(pixels.shape)}")
        weight = self.vision_encoder.conv1._linear.weight
        return self.vision_adapter(self.vision_encoder(pixels.to(device=weight.device, dtype=weight.dtype)))
