"""The model card (README.md) of an exported folder: what it is, how its weights were made, and
the licence they carry, which is the source's, not this tool's."""

from __future__ import annotations

from . import __version__
from .config import ModelConfig, official_name

# The licences on Apple's AIMv2 model cards at ml-aim's pinned revisions: the 1B and 3B
# encoders and the LiT model under the Apple Machine Learning Research Model licence (research
# use only; e.g. apple/aimv2-1B-patch14-224 commit 4d24a42 "AMLR license"), the L encoders
# under the Apple Sample Code License. Anything else points at the source's own card.
RESEARCH_ONLY = (
    "apple-amlr",
    "the Apple Machine Learning Research Model License (research use only)",
)
SAMPLE_CODE = ("apple-ascl", "the Apple Sample Code License")
OURS = (
    "mit",
    "MIT, as aimv2-mlx itself: the weights were pre-trained from random initialisation here",
)

RESTRICTIVENESS = ("mit", "apple-ascl", "other", "apple-amlr")  # least to most
LOADERS = {
    "transformers": [
        "from transformers import {cls}",
        'model = {cls}.from_pretrained("{folder}"{eager})',
    ],
    "ml-aim": [
        "from safetensors.torch import load_file",
        'model.load_state_dict(load_file("{folder}/model.safetensors"))  # apple/ml-aim\'s AIMv2',
    ],
    "mlx": ["import aimv2_mlx", 'model = aimv2_mlx.load("{folder}")'],
}


def licence_of(config: ModelConfig) -> tuple[str, str]:
    """(hub licence id, sentence) of the weights, judged by where they came from.

    Every official AIMv2 name recorded anywhere in the config's `source` counts (a LiT tower
    or a run's starting weights carry their origin's licence); the most restrictive one wins.
    """
    source = config.source
    names = {official_name(text.removeprefix("hf://")) for text in _strings(source)} - {None}
    if names:
        licences = [_official_licence(name) for name in sorted(names)]
        return max(licences, key=lambda licence: RESTRICTIVENESS.index(licence[0]))
    origin = str(source.get("origin", ""))
    if origin == "aimv2 pretrain" and not source.get("init_from"):
        return OURS
    if (
        origin == "aimv2 lit"
        and source.get("encoder_identity", {}).get("origin") == "aimv2 pretrain"
    ):
        return "mit", (
            "MIT, as aimv2-mlx itself: the image encoder was pre-trained from random "
            "initialisation here and the text tower LiT-tuned here"
        )
    return "other", f"the licence of the source, `{origin or 'unknown'}`: check it before sharing"


def _official_licence(name: str) -> tuple[str, str]:
    size = name.split("-")[1]
    if size in ("1B", "3B") or name.endswith("-lit"):
        return RESEARCH_ONLY
    if size == "large":
        return SAMPLE_CODE
    return "other", f"the licence on the source's model card, https://huggingface.co/apple/{name}"


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def how_made(config: ModelConfig) -> str:
    """One sentence on the weights' history, from what config.json's `source` recorded."""
    source = config.source
    if source.get("origin") == "aimv2 lit":
        encoder = source.get("encoder_identity", {}).get("name") or source.get("encoder")
        samples = f", {source['samples_seen']:,} pairs" if source.get("samples_seen") else ""
        data = f" on `{source['data']}`" if source.get("data") else ""
        return (
            f"The {source.get('trained', 'text tower')} LiT-tuned with `aimv2 lit` (aimv2-mlx) "
            f"for {source.get('step')} steps{samples}{data} against the locked image encoder "
            f"`{encoder}`, whose weights are unchanged ({source.get('loss', 'softmax')} "
            "contrastive loss; LiT, arXiv 2111.07991)."
        )
    if "step" in source:
        samples = f", {source['samples_seen']:,} samples" if source.get("samples_seen") else ""
        data = f" on `{source['data']}`" if source.get("data") else ""
        objective = f", objective {source['objective']}" if source.get("objective") else ""
        start = (
            f"from `{source['init_from']}`"
            if source.get("init_from")
            else "from random initialisation"
        )
        return (
            f"Pre-trained {start} with `aimv2 pretrain` (aimv2-mlx) for {source['step']} steps"
            f"{samples}{data}{objective} (AIMv2 recipe, arXiv 2411.14402)."
        )
    if source.get("layout"):
        revision = f" at revision `{source['revision']}`" if source.get("revision") else ""
        return (
            f"Converted by `aimv2 convert` from `{source.get('origin')}`{revision} "
            f"({source['layout']} layout); the weights are the released ones, unchanged."
        )
    details = ", ".join(f"{k}: {v}" for k, v in source.items())
    return (
        f"Made with aimv2-mlx; its config records {details}."
        if details
        else "Made with aimv2-mlx; its config records nothing of the weights' history."
    )


def model_card(config: ModelConfig, fmt: str, folder_name: str) -> str:
    licence_id, licence = licence_of(config)
    kind = "LiT (image + text) model" if config.is_lit else "vision encoder"
    cls = "Aimv2Model" if config.is_lit else "Aimv2VisionModel"
    layout = {
        "transformers": f"transformers' `{cls}`",
        "ml-aim": "apple/ml-aim's PyTorch",
        "mlx": "aimv2-mlx's MLX",
    }[fmt]
    # Eager attention for LiT: transformers' SDPA path drops an all-ones attention_mask and the
    # text tower then attends both ways (modeling_aimv2.py, Aimv2TextModel).
    eager = ', attn_implementation="eager"' if config.is_lit else ""
    code = [line.format(cls=cls, folder=folder_name, eager=eager) for line in LOADERS[fmt]]
    return "\n".join(
        [
            "---",
            f"license: {licence_id}",
            f"library_name: {'transformers' if fmt == 'transformers' else fmt}",
            "tags: [aimv2, vision, aimv2-mlx]",
            "---",
            f"# {config.name}",
            "",
            f"AIMv2 {kind} in {layout} layout, exported by aimv2-mlx {__version__} "
            + f"(`aimv2 export --format {fmt}`).",
            "",
            "## How the weights were made",
            "",
            how_made(config),
            "",
            "## Licence",
            "",
            f"The weights are under {licence}.",
            "",
            "## Use",
            "",
            "```python",
            *code,
            "```",
            "",
        ]
    )
