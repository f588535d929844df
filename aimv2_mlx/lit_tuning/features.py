"""The locked encoder's features, computed once through the embed pipeline and cached in the run.

LiT's image tower is locked (arXiv 2111.07991, Section 3), so its output for an image never
changes: `embed_folder` writes every image's post-trunk tokens (`--pool tokens`) into
`RUN/features/` once, with its decoding, failure list, resume and lock; training reads them back.
A resumed run finds the shards done and reuses them; an image the pipeline cannot decode is left
out of training and listed in `features/failures.jsonl`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.captioned import CaptionedImages
from ..embed import embed_folder
from ..errors import SettingError, UnusableFileError
from ..folders import atomic_write
from ..shards import read_shards

FEATURES = "features"
IMAGE_LIST = "images.txt"  # the plain image files of the data, one a line, as embed's input


@dataclass
class Features:
    tokens: np.ndarray  # (N, T, D) the encoder's tokens of each usable sample
    captions: list[str]  # their captions, in the same order
    failed: int  # samples whose image could not be decoded (left out)


def embed_inputs(source: CaptionedImages, run: Path) -> tuple[list[Path], list[str]]:
    """The inputs `embed_folder` reads to cover `source`, and each sample's key in its outputs.

    Plain files are listed (absolute paths) in RUN/images.txt; tar members are read from their
    tars, keyed by member name, under the tar's name when there are several (as `discover` does).
    """
    if all(sample.member is None for sample in source.samples):
        paths = [str(Path(sample.path).resolve()) for sample in source.samples]
        bad = next((p for p in paths if "\n" in p or "\r" in p), None)
        if bad is not None:
            raise SettingError(
                f"{bad!r}: an image path with a line break cannot be listed for the encoder"
            )
        text = "".join(f"{path}\n" for path in dict.fromkeys(paths))
        atomic_write(run / IMAGE_LIST, lambda tmp: tmp.write_text(text, errors="surrogateescape"))
        return [run / IMAGE_LIST], paths
    tars = sorted({Path(sample.path) for sample in source.samples})
    prefix = len(tars) > 1
    keys = [(f"{Path(s.path).name}/" if prefix else "") + s.member for s in source.samples]
    return tars, keys


def cache_features(
    source: CaptionedImages,
    run: Path,
    encoder,
    dtype: str = "float32",
    batch_size: int = 32,
    progress=None,
) -> Features:
    """Embed (or reuse) every image's tokens into RUN/features and align them with the captions."""
    inputs, keys = embed_inputs(source, run)
    embed_folder(
        inputs,
        run / FEATURES,
        encoder,
        pool="tokens",
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
    )
    vectors, table = read_shards(run / FEATURES)
    row = {key: i for i, key in enumerate(table.column("path").to_pylist())}
    usable = [i for i, key in enumerate(keys) if key in row]
    if len(usable) < 2:
        raise UnusableFileError(
            f"{source.origin}: fewer than two images could be decoded "
            f"(see {run / FEATURES / 'failures.jsonl'})"
        )
    return Features(
        vectors[[row[keys[i]] for i in usable]],
        [source.samples[i].caption for i in usable],
        len(keys) - len(usable),
    )
