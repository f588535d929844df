"""The contrastive loss: CLIP's symmetric softmax cross-entropy (Radford et al., arXiv 2103.00020,
Figure 3), the loss LiT was introduced with (arXiv 2111.07991, Section 3).

Why softmax and not SigLIP's sigmoid (arXiv 2303.15343): the LiT checkpoint format — Apple's
`aimv2-large-patch14-224-lit` and transformers' `Aimv2Model` — has a logit scale and no logit
bias, so a sigmoid model's learned bias could not be exported; and at the batch sizes a laptop
affords (tens to hundreds of pairs) softmax is what SigLIP itself found as good (its Figure 2).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..lit import l2_normalize


def clip_loss(image: mx.array, text: mx.array, scale: mx.array) -> mx.array:
    """Mean of the image→text and text→image cross-entropies over a batch of matching pairs:
    row i of `image` (B, D) and of `text` (B, D) belong together; embeddings not yet normalised."""
    logits = scale * l2_normalize(text) @ l2_normalize(image).T
    labels = mx.arange(logits.shape[0])
    per_text = nn.losses.cross_entropy(logits, labels, reduction="mean")
    per_image = nn.losses.cross_entropy(logits.T, labels, reduction="mean")
    return (per_text + per_image) / 2
