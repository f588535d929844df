"""Zero-shot classification with the LiT model: class names become text embeddings, CLIP-style.

Each class is written into every prompt template; its text embedding is the mean of the
L2-normalised template embeddings, normalised again (CLIP's prompt ensembling). Image-to-class
logits are `logit_scale · image @ classᵀ` on normalised embeddings; probabilities their softmax.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import SettingError, UnusableFileError
from .images import ImageInput, open_image, to_pixels
from .text_embed import embed_texts, model_tokenizer
from .tokenizer import CaptionTokenizer
from .vectors import l2_normalize, softmax

# Six of the seven prompts CLIP's authors selected for ImageNet ("Prompt Engineering for
# ImageNet" notebook; "a origami {}." left out) plus the plain "a photo of a {}.".
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a bad photo of the {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "art of the {}.",
    "itap of a {}.",
    "a {} in a video game.",
)
# A LiT folder may carry the prompts its text tower suits (one template a line, `{}` for the
# label); they replace CLIP's when no templates are given (the bundled toy's captions are not
# photos: "a large {}" suits it, "a photo of a {}." does not).
TEMPLATES_FILE = "templates.txt"


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty, stripped lines of a text file (labels or templates, one per line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UnusableFileError(f"{path}: not a UTF-8 text file (one entry a line)") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


class ZeroShotClassifier:
    """A LiT model with its class embeddings computed once; call it on images for probabilities."""

    def __init__(
        self,
        model,
        labels: Sequence[str],
        templates: Sequence[str] | None = None,
        tokenizer: CaptionTokenizer | None = None,
    ):
        config = model.config
        if not config.is_lit:
            raise SettingError(
                f"{config.name}: not a LiT model (no text tower); zero-shot needs one such as "
                "apple/aimv2-large-patch14-224-lit"
            )
        self.model = model
        self.labels = _check_labels(labels)
        chosen = templates if templates is not None else model_templates(model)
        self.templates = _check_templates(chosen)
        self.tokenizer = tokenizer or model_tokenizer(model)
        self.class_embeddings = self._embed_classes()

    def _embed_classes(self) -> mx.array:
        """(C, D): per class, the re-normalised mean of its normalised template embeddings."""
        prompts = [template.format(label) for label in self.labels for template in self.templates]
        text = embed_texts(self.model, prompts, self.tokenizer)
        text = l2_normalize(text.reshape(len(self.labels), len(self.templates), -1).mean(axis=1))
        mx.eval(text)
        return text

    def logits(self, pixels: mx.array) -> np.ndarray:
        """float32 (B, C) logits for preprocessed pixels (B, H, W, 3)."""
        image = l2_normalize(self.model.encode_image(pixels))
        return np.array(
            self.model.logit_scale() * image @ self.class_embeddings.T, dtype=np.float32
        )

    def __call__(self, images: Iterable[ImageInput] | mx.array, batch_size: int = 8) -> np.ndarray:
        """float32 (N, C) class probabilities for image paths, PIL images, or preprocessed
        pixels.
        """
        if isinstance(images, mx.array):
            batches = [images[i : i + batch_size] for i in range(0, images.shape[0], batch_size)]
        else:
            batches = _pixel_batches(list(images), self.model, batch_size)
        logits = [self.logits(batch) for batch in batches]
        if not logits:
            return np.zeros((0, len(self.labels)), np.float32)
        return softmax(np.concatenate(logits))


def zero_shot(
    images: Iterable[ImageInput] | mx.array,
    model,
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    tokenizer: CaptionTokenizer | None = None,
    batch_size: int = 8,
) -> np.ndarray:
    """float32 (N, C) probabilities of each label for each image; the templates default to the
    model folder's `templates.txt` or CLIP's, the tokenizer to the model's."""
    return ZeroShotClassifier(model, labels, templates, tokenizer)(images, batch_size)


def _pixel_batches(images: list, model, batch_size: int):
    config, patch = model.config.preprocess, model.config.vision.patch_size
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        yield mx.array(np.stack([to_pixels(open_image(img), config, patch) for img in chunk]))


def model_templates(model) -> list[str]:
    """The model folder's `templates.txt` when it has one, else CLIP's `DEFAULT_TEMPLATES`."""
    location = model.location
    if location is not None and (location.folder / TEMPLATES_FILE).is_file():
        return read_lines(location.folder / TEMPLATES_FILE)
    return list(DEFAULT_TEMPLATES)


def _check_labels(labels: Sequence[str]) -> list[str]:
    labels = [label.strip() for label in labels]
    if not labels or not all(labels):
        raise SettingError("zero-shot needs at least one label, and no empty ones")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise SettingError(f"label given more than once: {', '.join(repeated)}")
    return labels


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise SettingError("zero-shot needs at least one prompt template")
    for template in templates:
        try:
            ok = template.format("\0").count("\0") == 1
        except (ValueError, IndexError, KeyError):
            ok = False
        if not ok:
            raise SettingError(
                f"template {template!r}: needs exactly one {{}} where the label goes "
                "(other braces doubled)"
            )
    return templates
