"""LiT-tuning (Zhai et al., arXiv 2111.07991): a text tower trained contrastively against a locked
image encoder, so that any AIMv2 encoder — one pre-trained here included — gets zero-shot
classification and text search. `lit_tune` runs it, `export_lit` writes the LiT model folder."""

from .config import LitConfig
from .export import export_lit, is_lit_run
from .loop import lit_tune

__all__ = ["LitConfig", "export_lit", "is_lit_run", "lit_tune"]
