"""LaRE²'s EGRE classifier: CLIP features refined spatially and per channel by a guidance map."""

from __future__ import annotations

import torch
from torch import nn

from lightning_modules.detectors.base import Backbone, DetectorBase, DetectorOutput, GuidanceName


class LaRE2Detector(DetectorBase):
    """Error-guided refinement (EGRE) over CLIP RN50 layer3 (C×g×g) and the attnpool vector (D).

    Notation as in DetectorBase: tokens x_n ∈ R^C (N = g²) of layer3, guidance u (G = 4·k channels)
    adaptive-average-pooled to g×g and BatchNorm-standardised.

    Spatial branch (always present): query = mean_n x_n + p_0, keys = values = x_n + p_n (learned
    positional embedding p, N+1 rows), `nn.MultiheadAttention` with `num_heads` heads of C/heads
    dims (8 × 128 for RN50's C = 1024); refined = LayerNorm(query + attention). With `spatial=True` a 1×1 conv
    G→heads on u gives one additive bias per head and position on the attention logits (passed as
    the float `attn_mask` of shape (B·heads, 1, N)); without it the branch is plain attention pooling.
    Channel branch: pooled layer3 mean_n x_n; with `channel=True` it is gated by
    sigmoid(MLP(mean_n u_n)), MLP = Linear G→`gate_hidden` → ReLU → Linear → C.
    Head: [refined (C), channel (C), pooled (D)] → Linear → 2 (3072 inputs for RN50).

    Ablation grid: guidance=[] with spatial=channel=False is the baseline; spatial/channel need
    guidance and guidance needs one of them (either mismatch is an error, not a silent no-op).
    Training: CE, Adam lr 1e-4, ReduceLROnPlateau on `val_loss` (factor `plateau_factor`, patience
    `plateau_patience` epochs); LaRE²'s gradient clipping at 5 is the trainer's
    `gradient_clip_val: 5` (configs/lare2.yaml), and its batch 48 the datamodule's.

    Args:
        guidance: cached guidance maps the head is steered by, in order (4 channels each); [] = plain CLIP.
        backbone: frozen = read CLIP maps from the feature store (fast sweeps); finetune = train CLIP on images.
        clip: CLIP RN50 weights for finetune ('openai', a checkpoint file or an open_clip local-dir).
        visual_channels: channels of CLIP's layer3 map (1024 for RN50).
        pooled_dim: dimension of CLIP's attention-pooled vector (1024 for RN50).
        grid_size: side of CLIP's layer3 grid (14 at 224 px).
        num_heads: attention heads.
        spatial: spatial refinement (LaRE → per-head bias on the attention logits).
        channel: channel refinement (LaRE → sigmoid gate on the pooled layer3 channels).
        gate_hidden: hidden width of the channel-refinement MLP.
        lr: Adam learning rate.
        guidance_norm: how guidance maps are standardised before the head (scale-free by default).
        norm_rows: training rows the guidance standardisation is fitted on, once, at the start of fit.
        plateau_factor: ReduceLROnPlateau factor on val_loss.
        plateau_patience: ReduceLROnPlateau patience in epochs.
    """

    def __init__(self, guidance: list[GuidanceName] = ["lare"], backbone: Backbone = "frozen",
                 clip: str | None = None, visual_channels: int = 1024, pooled_dim: int = 1024, grid_size: int = 14,
                 num_heads: int = 8, spatial: bool = True, channel: bool = True, gate_hidden: int = 128,
                 lr: float = 1e-4, plateau_factor: float = 0.5, plateau_patience: int = 2) -> None:
        if bool(guidance) != (spatial or channel):
            raise ValueError(f"LaRE2Detector: guidance={list(guidance)} with spatial={spatial}, channel={channel}: "
                             "refinement needs guidance maps and guidance maps need spatial or channel refinement")
        super().__init__(guidance, backbone, clip, visual_channels, pooled_dim, grid_size, lr)
        self.save_hyperparameters()
        self.num_heads = num_heads
        self.plateau_factor = plateau_factor
        self.plateau_patience = plateau_patience
        self.position = nn.Parameter(torch.randn(grid_size * grid_size + 1, visual_channels) / visual_channels ** 0.5)
        self.attention = nn.MultiheadAttention(visual_channels, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(visual_channels)
        self.head_bias = nn.Conv2d(self.guidance_channels, num_heads, kernel_size=1) if spatial else None
        self.gate = nn.Sequential(nn.Linear(self.guidance_channels, gate_hidden), nn.ReLU(),
                                  nn.Linear(gate_hidden, visual_channels)) if channel else None
        self.head = nn.Linear(2 * visual_channels + pooled_dim, 2)

    def forward(self, batch: dict) -> DetectorOutput:
        layer3, pooled = self.visual_features(batch)
        tokens = layer3.flatten(2).transpose(1, 2)  # (B, N, C)
        u = self.guidance_map(batch, layer3.shape[-2:]) if self.guidance else None
        query = tokens.mean(dim=1, keepdim=True) + self.position[:1]
        keys = tokens + self.position[1:]
        bias = None
        if self.head_bias is not None:
            bias = self.head_bias(u).flatten(2).reshape(-1, 1, tokens.shape[1])  # (B·heads, 1, N), batch-major
        attended, _ = self.attention(query, keys, keys, attn_mask=bias, need_weights=False)
        refined = self.norm(query + attended).squeeze(1)
        channel = layer3.mean(dim=(2, 3))
        if self.gate is not None:
            channel = torch.sigmoid(self.gate(u.mean(dim=(2, 3)))) * channel
        features = torch.cat([refined, channel, pooled], dim=1)
        return DetectorOutput(self.head(features), features)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=self.plateau_factor,
                                                               patience=self.plateau_patience)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val_loss",
                                                          "interval": "epoch"}}
