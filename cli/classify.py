"""`aimv2 classify IMAGES…`: each image's most likely labels, zero-shot from class names or from
a probe trained by `aimv2 probe`.

A mode is anything with `.labels`, `.model` and `classifier(images, batch_size) -> (N, C)
probabilities`; `build_classifier` picks it from the options.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from aimv2_mlx.data.sources import images_under
from aimv2_mlx.errors import SettingError
from aimv2_mlx.images import ImageError, open_image
from aimv2_mlx.model import HubUnreachableError, ModelNotFoundError, load
from aimv2_mlx.probe import ProbeClassifier
from aimv2_mlx.zeroshot import DEFAULT_TEMPLATES, ZeroShotClassifier, read_lines

import typer

from .errors import one_line_errors
from .options import at_least, expand, output_file

DEFAULT_LIT = "apple/aimv2-large-patch14-224-lit"


def classify(
    images: list[Path] = typer.Argument(..., help="Image files or folders (searched recursively)."),
    zero_shot: str = typer.Option(
        None, "--zero-shot", help='Comma-separated class names: "cat,dog,car".'
    ),
    labels_file: Path = typer.Option(None, "--labels-file", help="Class names, one per line."),
    templates: Path = typer.Option(
        None,
        "--templates",
        help="Prompt templates, one per line, '{}' where the label goes "
        f"(default: the model folder's templates.txt, else "
        f"{len(DEFAULT_TEMPLATES)} CLIP prompts).",
    ),
    probe: Path = typer.Option(
        None, "--probe", help="A folder written by `aimv2 probe`: classify with its head."
    ),
    head: str = typer.Option(
        None,
        "--head",
        help="With --probe: linear | knn | attentive (default: the saved "
        "head with the best validation accuracy).",
    ),
    model: str = typer.Option(
        None,
        "-m",
        "--model",
        help=f"Model folder or hub id (zero-shot default: {DEFAULT_LIT}; "
        "--probe: the probe's own).",
    ),
    top_k: int = typer.Option(5, "--top-k", help="Labels shown per image."),
    batch_size: int = typer.Option(8, "-b", "--batch-size", help="Images per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
    output: Path = typer.Option(
        None, "-o", "--output", help="Also write image,rank,label,probability rows to a CSV."
    ),
) -> None:
    """Classify images; prints each image's top-k labels with their probabilities."""
    images, output = [expand(path) for path in images], expand(output)
    with one_line_errors():
        at_least(1, top_k=top_k, batch_size=batch_size)
        if output is not None:
            output_file(output)
        files = collect_images(images)
        classifier = build_classifier(model, zero_shot, labels_file, templates, probe, head)
        results, skipped = classify_files(files, classifier, batch_size, top_k)
        if not results:
            raise SettingError(f"none of the {len(files)} images could be read")
        if output is not None:
            write_csv(output, results)
    head = head_summary(classifier)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "model": classifier.model.config.name,
                    **head,
                    "labels": classifier.labels,
                    "results": results,
                    "skipped": skipped,
                },
                indent=2,
            )
        )
        return
    if head:
        accuracy = head["head_val_accuracy"]
        typer.echo(
            f"probe head: {head['head']}"
            + (f" (validation accuracy {accuracy:.3f})" if accuracy is not None else "")
        )
    for result in results:
        typer.echo(result["image"])
        for entry in result["top"]:
            typer.echo(f"  {entry['probability']:.4f}  {entry['label']}")


def collect_images(paths: list[Path]) -> list[Path]:
    """Files as given, folders expanded to the images under them."""
    files: list[Path] = []
    for path in paths:
        files.extend(images_under(path) if path.is_dir() else [path])
    if not files:
        raise FileNotFoundError(f"{', '.join(map(str, paths))}: no images found")
    return files


def head_summary(classifier) -> dict:
    """Which probe head classified, and its validation accuracy (empty for zero-shot)."""
    if not isinstance(classifier, ProbeClassifier):
        return {}
    return {
        "head": classifier.head,
        "head_val_accuracy": classifier.probe.record["heads"][classifier.head].get("val_accuracy"),
    }


def build_classifier(
    model: str | None,
    zero_shot: str | None,
    labels_file: Path | None,
    templates: Path | None,
    probe: Path | None = None,
    head: str | None = None,
):
    """The classifier the options ask for: a trained probe, or zero-shot from class names."""
    if probe is not None:
        if zero_shot is not None or labels_file is not None:
            raise SettingError(
                "--probe classifies with the probe's own classes: drop --zero-shot/--labels-file"
            )
        return ProbeClassifier(probe, model=load(model) if model else None, head=head)
    if head is not None:
        raise SettingError("--head applies only with --probe")
    if zero_shot is not None and labels_file is not None:
        raise SettingError("give the class names with --zero-shot or --labels-file, not both")
    if zero_shot is not None:
        labels = [label.strip() for label in zero_shot.split(",") if label.strip()]
    elif labels_file is not None:
        labels = read_lines(labels_file)
    else:
        raise SettingError('no class names: give --zero-shot "cat,dog,…" or --labels-file FILE')
    if not labels:
        raise SettingError(f"{labels_file or '--zero-shot'}: no class names in it")
    prompts = read_lines(templates) if templates is not None else None  # the model's own, or CLIP's
    try:
        lit = load(model or DEFAULT_LIT)
    except ModelNotFoundError as exc:
        if model is None:  # offline: the bundled LiT toy, as `load_default` falls back to it
            reason = (
                f"{exc.repo}: not cached and the hub ({exc.url}) cannot be reached"
                if isinstance(exc, HubUnreachableError)
                else str(exc)
            )
            typer.echo(
                f"{reason}; using the bundled offline LiT model, a toy trained on "
                "`aimv2 data shapes` (choose it with -m bundled; HF_HUB_OFFLINE=1 skips "
                "the hub)",
                err=True,
            )
            return ZeroShotClassifier(load("bundled"), labels, prompts)
        if not isinstance(exc, HubUnreachableError):
            raise
        raise ModelNotFoundError(
            f"{exc.repo}: not in the Hugging Face cache and the hub ({exc.url}) cannot be reached; "
            "zero-shot needs "
            "a LiT model: download it once online, or pass -m a local LiT folder (or -m bundled, a "
            "toy), and set HF_HUB_OFFLINE=1 to skip the hub"
        ) from None
    return ZeroShotClassifier(lit, labels, prompts)


def classify_files(
    files: list[Path], classifier, batch_size: int, top_k: int
) -> tuple[list[dict], list[dict]]:
    """Top-k labels per readable image; unreadable ones are reported on stderr and skipped."""
    results, skipped = [], []
    for start in range(0, len(files), batch_size):
        decoded = []
        for path in files[start : start + batch_size]:
            try:
                decoded.append((path, open_image(path)))
            except ImageError as exc:
                typer.echo(f"skipped {exc}", err=True)
                skipped.append({"image": str(path), "reason": str(exc)})
        if not decoded:
            continue
        probabilities = classifier([image for _, image in decoded], batch_size)
        for (path, _), row in zip(decoded, probabilities, strict=True):
            order = row.argsort()[::-1][:top_k]
            results.append(
                {
                    "image": str(path),
                    "top": [
                        {"label": classifier.labels[i], "probability": float(row[i])} for i in order
                    ],
                }
            )
    return results, skipped


def write_csv(path: Path, results: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "rank", "label", "probability"])
        for result in results:
            for rank, entry in enumerate(result["top"], start=1):
                writer.writerow(
                    [result["image"], rank, entry["label"], f"{entry['probability']:.6f}"]
                )
