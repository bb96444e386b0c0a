"""SegFormer's Mix Transformer encoder, MiT-B1 (Xie et al., "SegFormer", NeurIPS 2021),
with the parameter names of the reference ``mix_transformer.py`` that segmentation stages
such as LPD load (``patch_embed1.proj``, ``block1.0.attn.kv``, ``norm1``, ...), so that an
export is the state dict itself. Checked against transformers' ``SegformerModel`` in the
tests.

LayerNorms follow the reference: eps 1e-6 in the blocks and after each stage, the
PyTorch default (1e-5) in the patch embeddings and the spatial-reduction norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIT_B1 = {"embed_dims": (64, 128, 320, 512), "num_heads": (1, 2, 5, 8), "depths": (2, 2, 2, 2),
          "sr_ratios": (8, 4, 2, 1), "mlp_ratio": 4}
BLOCK_EPS = 1e-6


class OverlapPatchEmbed(nn.Module):
    """Overlapping patches: a strided convolution, then LayerNorm over channels."""

    def __init__(self, in_channels: int, dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel, stride, padding=kernel // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class EfficientAttention(nn.Module):
    """Multi-head attention whose keys and values come from a sequence shrunk by
    ``sr_ratio`` in each spatial direction. ``kv`` holds keys first, then values."""

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, tokens, dim = x.shape
        q = self.q(x).view(batch, tokens, self.heads, -1).transpose(1, 2)
        context = x
        if self.sr_ratio > 1:
            grid = x.transpose(1, 2).reshape(batch, dim, height, width)
            context = self.norm(self.sr(grid).flatten(2).transpose(1, 2))
        k, v = self.kv(context).view(batch, -1, 2, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as the reference
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DepthwiseConv(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        batch, _, dim = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(batch, dim, height, width)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Linear, 3x3 depthwise convolution (the positional information), GELU, linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DepthwiseConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), height, width)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, height: int, width: int) -> Tensor:
        x = x + self.attn(self.norm1(x), height, width)
        return x + self.mlp(self.norm2(x), height, width)


class MixVisionTransformer(nn.Module):
    """Four stages of (patch embedding, blocks, LayerNorm). ``forward`` returns the
    last stage average-pooled, the representation pretraining learns; ``stages`` returns
    the four feature maps a segmentation decoder uses. ``strides`` are the patch
    embeddings' (LPD uses (4, 2, 2, 1)); the weights do not depend on them."""

    def __init__(self, embed_dims=MIT_B1["embed_dims"], num_heads=MIT_B1["num_heads"], depths=MIT_B1["depths"],
                 sr_ratios=MIT_B1["sr_ratios"], mlp_ratio: int = MIT_B1["mlp_ratio"],
                 strides: tuple[int, ...] = (4, 2, 2, 2)) -> None:
        super().__init__()
        self.num_features = embed_dims[-1]
        in_channels = 3
        for i, (dim, heads, depth, sr, stride) in enumerate(zip(embed_dims, num_heads, depths, sr_ratios, strides), 1):
            setattr(self, f"patch_embed{i}", OverlapPatchEmbed(in_channels, dim, 7 if i == 1 else 3, stride))
            setattr(self, f"block{i}", nn.ModuleList(Block(dim, heads, sr, mlp_ratio) for _ in range(depth)))
            setattr(self, f"norm{i}", nn.LayerNorm(dim, eps=BLOCK_EPS))
            in_channels = dim
        init_like_reference(self)

    def stages(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for i in range(1, 5):
            x, height, width = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, height, width)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, height, width)
            outputs.append(x)
        return outputs

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)[-1].mean((2, 3))


@torch.no_grad()
def init_like_reference(model: nn.Module) -> None:
    """Truncated-normal linears (std 0.02), He-normal convolutions, unit LayerNorms."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            module.weight.normal_(0, (2.0 / fan_out) ** 0.5)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
