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


# --- the same weights as a Hugging Face SegformerModel ------------------------------------------------

# A block's parameters as transformers' SegformerModel names them on the hub (``nvidia/mit-b1``: transformers 4
# reads these names as they are, transformers 5 renames them when it loads). ``attn.kv`` is split into key
# and value first (:func:`segformer_state`).
SEGFORMER_BLOCK_NAMES = {
    "norm1": "layer_norm_1", "norm2": "layer_norm_2", "attn.q": "attention.self.query", "attn.k": "attention.self.key",
    "attn.v": "attention.self.value", "attn.sr": "attention.self.sr", "attn.norm": "attention.self.layer_norm",
    "attn.proj": "attention.output.dense", "mlp.fc1": "mlp.dense1", "mlp.dwconv": "mlp.dwconv", "mlp.fc2": "mlp.dense2",
}
# transformers' SegformerConfig for MiT-B1, as the hub's nvidia/mit-b1 holds it. Its LayerNorms all use
# PyTorch's eps 1e-5 (the reference's blocks use 1e-6): features differ by about 1e-5 relative.
SEGFORMER_CONFIG = {
    "model_type": "segformer", "architectures": ["SegformerModel"], "num_channels": 3, "num_encoder_blocks": 4,
    "depths": list(MIT_B1["depths"]), "sr_ratios": list(MIT_B1["sr_ratios"]),
    "hidden_sizes": list(MIT_B1["embed_dims"]),
    "patch_sizes": [7, 3, 3, 3], "strides": [4, 2, 2, 2], "num_attention_heads": list(MIT_B1["num_heads"]),
    "mlp_ratios": [MIT_B1["mlp_ratio"]] * 4, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0, "classifier_dropout_prob": 0.1, "initializer_range": 0.02,
    "drop_path_rate": 0.1, "layer_norm_eps": 1e-6, "decoder_hidden_size": 256, "semantic_loss_ignore_index": 255,
    "reshape_last_stage": True,
}


def segformer_name(key: str) -> str:
    """``block2.1.attn.q.weight`` -> ``encoder.block.1.1.attention.self.query.weight``."""
    part, rest = key.split(".", 1)
    stage = int(part[-1]) - 1
    if part.startswith("patch_embed"):
        return f"encoder.patch_embeddings.{stage}.{rest.replace('norm.', 'layer_norm.')}"
    if part.startswith("norm"):
        return f"encoder.layer_norm.{stage}.{rest}"
    index, inner = rest.split(".", 1)
    module = next(name for name in SEGFORMER_BLOCK_NAMES if inner.startswith(name + "."))
    return f"encoder.block.{stage}.{index}.{SEGFORMER_BLOCK_NAMES[module]}{inner[len(module):]}"


def split_keys_values(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict with each ``attn.kv`` split into ``attn.k`` and ``attn.v`` (kv holds keys first)."""
    split = {}
    for key, value in state.items():
        if ".attn.kv." in key:
            split[key.replace(".attn.kv.", ".attn.k.")], split[key.replace(".attn.kv.", ".attn.v.")] = value.chunk(2)
        else:
            split[key] = value
    return split


def segformer_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our (LPD's) MiT state dict under SegformerModel's names."""
    return {segformer_name(key): value.contiguous() for key, value in split_keys_values(state).items()}


def from_segformer_state(hub: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`segformer_state`: a SegformerModel's weights (hub names, an optional
    ``segformer.`` prefix) under our names; names it does not know are kept, for the caller to refuse."""
    ours = {segformer_name(key): key for key in split_keys_values(MixVisionTransformer().state_dict())}
    state = {ours.get(key, key): value for key, value in
             ((key.removeprefix("segformer."), value) for key, value in hub.items())}
    for key in [k for k in state if ".attn.k." in k]:
        value_key = key.replace(".attn.k.", ".attn.v.")
        if value_key in state:
            state[key.replace(".attn.k.", ".attn.kv.")] = torch.cat([state.pop(key), state.pop(value_key)])
    return state
