"""Every probe head type by name; the order is the preference among equally good heads
(the cheaper head first)."""

from __future__ import annotations

from .attentive import AttentiveHead
from .head import ProbeHead
from .knn import KnnHead
from .linear import LinearHead

HEAD_TYPES: dict[str, type[ProbeHead]] = {
    head.name: head for head in (LinearHead, KnnHead, AttentiveHead)
}
HEADS = tuple(HEAD_TYPES)
