"""LaRE²'s EGRE classifier: CLIP features refined spatially and per channel by a guidance map."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.detectors.base import DetectorBase, DetectorOutput, GuidanceName


class GuidedAttentionPool(nn.Module):
    """The official code's `MultiHeadMapAttention`: the mean token attends over [mean; tokens] + positions.

    Tokens x (B, N, C) become keys/values s = [mean_n x_n; x_1..x_N] + p (N+1 rows, learned positional
    embedding p); the query is s_0. q, k, v are Linear C → heads·head_dim (8 × 64 = 512 for RN50, as
    the official d_k = d_v = 64), the output Linear heads·head_dim → C. An optional additive logit bias
    (B, heads, N+1) per head and key; softmax, dropout on the attention weights, output dropout, then
    LayerNorm(s_0 + out). Xavier weights and zero biases, as there.
    """

    def __init__(self, channels: int, grid_size: int, num_heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.position = nn.Parameter(torch.randn(grid_size * grid_size + 1, channels) / channels ** 0.5)
        self.query, self.key, self.value = (nn.Linear(channels, inner) for _ in range(3))
        self.out = nn.Linear(inner, channels)
        for layer in (self.query, self.key, self.value, self.out):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.attention_dropout = nn.Dropout(dropout)
        self.output_dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(channels)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # (B, h, n, d)

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, N, C), bias (B, heads, N+1) or None → refined mean token (B, C)."""
        sequence = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + self.position
        query = sequence[:, :1]
        q = self.split_heads(self.query(query))
        k, v = self.split_heads(self.key(sequence)), self.split_heads(self.value(sequence))
        logits = q @ k.transpose(-1, -2) / self.head_dim ** 0.5  # (B, h, 1, N+1)
        if bias is not None:
            logits = logits + bias[:, :, None, :]
        weights = self.attention_dropout(logits.softmax(dim=-1))
        attended = (weights @ v).transpose(1, 2).flatten(2)  # (B, 1, h·d)
        return self.norm(query + self.output_dropout(self.out(attended))).squeeze(1)


class LaRE2Detector(DetectorBase):
    """Error-guided refinement (EGRE) over CLIP RN50 layer3 (C×g×g) and the attnpool vector (D).

    Notation as in DetectorBase: tokens x_n ∈ R^C (N = g²) of layer3, guidance u (G channels, from the map registry)
    adaptive-average-pooled to g×g and standardised scale-free.

    Spatial branch (always present): `GuidedAttentionPool`, the mean token attending over the mean
    token and the N position tokens (N+1 keys). With `spatial=True` a 1×1 conv G→heads on u gives
    one additive bias per head and position on the attention logits; the mean key's bias is the
    mean over positions of that map (the official code appends the mean guidance token, and the
    conv is linear). Without it the branch is plain attention pooling.
    Channel branch: pooled layer3 mean_n x_n; with `channel=True` it is gated by
    sigmoid(MLP(mean_n u_n)), MLP = Linear G→`gate_hidden` → ReLU → Linear → C, both bias-free
    (the official ChannelAlignLayer).
    Head: [refined (C), channel (C), pooled (D)] → Linear → 2 (3072 inputs for RN50).

    Ablation grid: guidance=[] with spatial=channel=False is the baseline; spatial/channel need
    guidance and guidance needs one of them (either mismatch is an error, not a silent no-op).
    Training as the official script: CE, Adam lr 1e-4, ReduceLROnPlateau maximising `val_auroc`
    (the official score is the mean validation AUC; factor `plateau_factor`, patience
    `plateau_patience` epochs, floor `min_lr`); gradient clipping at 5 is the trainer's
    `gradient_clip_val: 5` (configs/lare2.yaml), batch 48 the datamodule's.

    The base's arguments (`backbone`, `clip`, CLIP's sizes, `lr`, `guidance_norm`, `norm_rows`) are DetectorBase's.

    Args:
        guidance: registered guidance maps the head is steered by, in order; [] = plain CLIP.
        num_heads: attention heads.
        head_dim: width of each attention head (the official code: 8 x 64, so 1024 -> 512 -> 1024).
        dropout: dropout in the attention and head (0.1 as the official code).
        spatial: spatial refinement (LaRE → per-head bias on the attention logits).
        channel: channel refinement (LaRE → sigmoid gate on the pooled layer3 channels).
        gate_hidden: hidden width of the channel-refinement MLP.
        plateau_factor: ReduceLROnPlateau factor (the schedule maximises val_auroc).
        plateau_patience: ReduceLROnPlateau patience in epochs.
        min_lr: ReduceLROnPlateau floor of the learning rate.
    """

    # The official training (train_classifier_wmap.sh, CLipClassifierWMapV6): all of CLIP trains, raw LaRE maps.
    paper_setting = {"guidance": ["lare"], "backbone": "finetune", "num_heads": 8, "head_dim": 64, "dropout": 0.1,
                     "spatial": True, "channel": True, "gate_hidden": 128, "lr": 1e-4, "guidance_norm": "none"}

    def __init__(self, guidance: list[GuidanceName] = ["lare"], num_heads: int = 8, head_dim: int = 64,
                 dropout: float = 0.1, spatial: bool = True, channel: bool = True, gate_hidden: int = 128,
                 plateau_factor: float = 0.5, plateau_patience: int = 4, min_lr: float = 1e-7, **kwargs) -> None:
        if bool(guidance) != (spatial or channel):
            raise ValueError(f"LaRE2Detector: guidance={list(guidance)} with spatial={spatial}, channel={channel}: "
                             "refinement needs guidance maps and guidance maps need spatial or channel refinement")
        super().__init__(guidance=guidance, **kwargs)

    def configure_models(self) -> None:
        num_heads, head_dim, dropout = self.hparams.num_heads, self.hparams.head_dim, self.hparams.dropout
        spatial, channel, gate_hidden = self.hparams.spatial, self.hparams.channel, self.hparams.gate_hidden
        self.attention = GuidedAttentionPool(self.visual_channels, self.grid_size, num_heads, head_dim, dropout)
        self.head_bias = nn.Conv2d(self.guidance_channels, num_heads, kernel_size=1) if spatial else None
        self.gate = nn.Sequential(nn.Linear(self.guidance_channels, gate_hidden, bias=False), nn.ReLU(),
                                  nn.Linear(gate_hidden, self.visual_channels, bias=False)) if channel else None
        self.head = nn.Linear(2 * self.visual_channels + self.pooled_dim, 2)

    def forward(self, batch: dict) -> DetectorOutput:
        layer3, pooled = self.visual_features(batch)
        tokens = layer3.flatten(2).transpose(1, 2)  # (B, N, C)
        u = self.guidance_map(batch, layer3.shape[-2:]) if self.guidance else None
        bias = None
        if self.head_bias is not None:
            per_position = self.head_bias(u).flatten(2)  # (B, heads, N)
            bias = torch.cat([per_position.mean(dim=2, keepdim=True), per_position], dim=2)
        refined = self.attention(tokens, bias)
        channel = layer3.mean(dim=(2, 3))
        if self.gate is not None:
            channel = torch.sigmoid(self.gate(u.mean(dim=(2, 3)))) * channel
        features = torch.cat([refined, channel, pooled], dim=1)
        return DetectorOutput(self.head(features), features)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max",
                                                               factor=self.hparams.plateau_factor,
                                                               patience=self.hparams.plateau_patience,
                                                               min_lr=self.hparams.min_lr)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_auroc",
                                                          "interval": "epoch"}}
