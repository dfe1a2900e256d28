"""DEUA: CLIP features refined by attention that the diffusion epistemic uncertainty steers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from lightning_modules.detectors.base import DetectorBase, DetectorOutput, GuidanceName
from lightning_modules.losses import AsymmetricMarginLoss


class DEUADetector(DetectorBase):
    """DEUA's classifier (CE + asym_weight · asymmetric margin loss), with the attention made explicit.

    The paper leaves the attention open; this is the exact design. Notation: v = CLIP layer3 map
    (B, C, g, g) as N = g² tokens v_n ∈ R^C; u = guidance maps (channels per map from the map registry, G in all),
    adaptive-average-pooled to g×g and standardised scale-free (see DetectorBase), tokens u_n ∈ R^G.

    With guidance:
      1. Spatial weights a = softmax_n(w·u_n + b) (a Linear G→1 over positions).
      2. u-guided features ṽ_n = N·a_n·v_n; their mean token is the query q = Σ_n a_n v_n.
      3. z_v = LayerNorm(q + MHA(query=q, key=u_n, value=v_n)), `nn.MultiheadAttention` with
         embed_dim C, `num_heads` heads, kdim G (keys are projections of u only: where the
         uncertainty points decides which visual tokens are read), vdim C, no dropout.
      4. z_u = attention pooling of u, CLIP-attnpool style: e_n = W_e u_n + p_n (Linear G→
         `guidance_dim`, learned positional embedding p), query = mean_n e_n, z_u = MHA(query,
         e, e) with `num_heads` heads.
      5. features = [z_v, z_u] (C + guidance_dim) → Linear → 2 logits.
    Without guidance (`guidance=[]`, the plain CLIP baseline): a is uniform, q = mean_n v_n and the
    keys are the visual tokens themselves (self-attention pooling of layer3), features = z_v.

    The asymmetric loss (lightning_modules.losses) acts on `features` with margins margin_real,
    margin_fake; asym_weight=0 switches it off. Only layer3 is used, so in `finetune` mode CLIP's
    layer4 and attnpool are dropped and `pooled_dim` does not apply. Adam, lr 1e-4; the batch size
    (48 in the paper) is the datamodule's.

    The base's arguments (`backbone`, `clip`, CLIP's sizes, `lr`, `guidance_norm`, `norm_rows`) are DetectorBase's.

    Args:
        guidance: cached guidance maps the head is steered by, in order; [] = plain CLIP.
        num_heads: attention heads.
        guidance_dim: width of the guidance tokens in the attention pooling of u.
        asym_weight: weight of the asymmetric margin loss (0 switches it off).
        margin_real: cosine-similarity margin between real features.
        margin_fake: cosine-similarity margin between fake features.
    """

    uses_pooled = False
    # The paper does not say whether CLIP trains; it follows LaRE²'s end-to-end training (configs/deua_paper.yaml).
    # CLIP's sizes are the RN50 tower's (derived, not settings).
    paper_setting = {"guidance": ["deu"], "backbone": "finetune", "asym_weight": 0.5, "margin_real": 0.6,
                     "margin_fake": 1.0, "lr": 1e-4}

    def __init__(self, guidance: list[GuidanceName] = ["deu"], num_heads: int = 8, guidance_dim: int = 64,
                 asym_weight: float = 0.5, margin_real: float = 0.6, margin_fake: float = 1.0, **kwargs) -> None:
        super().__init__(guidance=guidance, **kwargs)

    def configure_losses(self) -> None:
        self.asym = AsymmetricMarginLoss(self.hparams.margin_real, self.hparams.margin_fake)

    def configure_models(self) -> None:
        num_heads, guidance_dim = self.hparams.num_heads, self.hparams.guidance_dim
        channels = self.visual_channels
        self.visual_norm = nn.LayerNorm(channels)
        if self.guidance:
            g = self.guidance_channels
            self.spatial_weight = nn.Linear(g, 1, bias=False)  # a bias shifts every position's logit: softmax ignores it
            self.visual_attention = nn.MultiheadAttention(channels, num_heads, kdim=g, vdim=channels, batch_first=True)
            self.guidance_embed = nn.Linear(g, guidance_dim)
            self.guidance_pos = nn.Parameter(torch.randn(self.grid_size ** 2, guidance_dim) / guidance_dim ** 0.5)
            self.guidance_pool = nn.MultiheadAttention(guidance_dim, num_heads, batch_first=True)
            self.head = nn.Linear(channels + guidance_dim, 2)
        else:
            self.visual_attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)
            self.head = nn.Linear(channels, 2)

    def forward(self, batch: dict) -> DetectorOutput:
        layer3, _ = self.visual_features(batch)
        tokens = layer3.flatten(2).transpose(1, 2)  # (B, N, C)
        if not self.guidance:
            query = tokens.mean(dim=1, keepdim=True)
            attended, _ = self.visual_attention(query, tokens, tokens, need_weights=False)
            features = self.visual_norm(query + attended).squeeze(1)
            return DetectorOutput(self.head(features), features)
        u = self.guidance_map(batch, layer3.shape[-2:]).flatten(2).transpose(1, 2)  # (B, N, G)
        weights = self.spatial_weight(u).softmax(dim=1)  # (B, N, 1)
        query = (weights * tokens).sum(dim=1, keepdim=True)
        attended, _ = self.visual_attention(query, u, tokens, need_weights=False)
        z_v = self.visual_norm(query + attended).squeeze(1)
        embedded = self.guidance_embed(u) + self.guidance_pos
        z_u, _ = self.guidance_pool(embedded.mean(dim=1, keepdim=True), embedded, embedded, need_weights=False)
        features = torch.cat([z_v, z_u.squeeze(1)], dim=1)
        return DetectorOutput(self.head(features), features)

    def losses(self, output: DetectorOutput, label: torch.Tensor) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(output.logits, label)
        if self.hparams.asym_weight == 0:
            return {"loss": ce}
        asym = self.asym(output.features, label)
        return {"loss": ce + self.hparams.asym_weight * asym, "ce": ce, "asym": asym}
