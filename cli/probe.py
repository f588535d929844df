"""`aimv2 probe TRAIN -o OUT`: how good are the features on my labelled images?"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from aimv2_mlx.model import load_named
from aimv2_mlx.probe import HEADS, AttentiveSettings, ProbeSettings
from aimv2_mlx.probe import probe as run_probe

import typer

from .errors import one_line_errors
from .options import at_least, block_list, expand, fraction, output_folder

DEFAULTS = ProbeSettings()  # the options' defaults are the library's


def probe(
    train: Path = typer.Argument(
        ..., help="ImageFolder root (root/class/*.jpg) or a CSV/parquet with path,label."
    ),
    output: Path = typer.Option(
        Path("probe"), "-o", "--output", help="Folder for metrics, split and heads."
    ),
    model: str = typer.Option(
        "default", "-m", "--model", help="Model folder or hub id ('default': as aimv2 embed)."
    ),
    heads: str = typer.Option(
        ",".join(DEFAULTS.heads), help=f"Comma-separated heads: {', '.join(HEADS)} (or 'all')."
    ),
    val_dir: Path = typer.Option(
        None, help="Validation set (else --val-fraction of the training set)."
    ),
    test_dir: Path = typer.Option(
        None, help="Test set (else --test-fraction of the training set)."
    ),
    val_fraction: float = typer.Option(
        DEFAULTS.val_fraction, help="Stratified validation fraction."
    ),
    test_fraction: float = typer.Option(
        DEFAULTS.test_fraction, help="Stratified test fraction, when no --test-dir."
    ),
    seed: int = typer.Option(DEFAULTS.seed, help="Seed of the splits and the attentive head."),
    normalize: bool = typer.Option(
        DEFAULTS.normalize, help="L2-normalise pooled features for the linear head."
    ),
    blocks: str = typer.Option(
        None,
        help="Use the mean of these blocks' raw outputs, e.g. '-6,-1' (default: last, normed).",
    ),
    epochs: int = typer.Option(DEFAULTS.attentive.epochs, help="Attentive head: epochs."),
    batch_size: int = typer.Option(
        DEFAULTS.attentive.batch_size, help="Attentive head: batch size."
    ),
    cache_dir: Path = typer.Option(
        None, help="Feature cache (default ~/.cache/aimv2-mlx/features)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON on stdout."),
) -> None:
    """Train linear / kNN / attentive probes on frozen features and report test metrics."""
    train, output, val_dir, test_dir, cache_dir = map(
        expand, (train, output, val_dir, test_dir, cache_dir)
    )
    with one_line_errors():
        fraction(val_fraction=val_fraction, test_fraction=test_fraction)
        at_least(1, epochs=epochs, batch_size=batch_size)
        output_folder(output)
        if cache_dir is not None:
            output_folder(cache_dir, "--cache-dir")
        names = HEADS if heads == "all" else tuple(h.strip() for h in heads.split(",") if h.strip())
        settings = ProbeSettings(
            heads=names,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
            normalize=normalize,
            blocks=block_list(blocks),
            attentive=AttentiveSettings(epochs=epochs, batch_size=batch_size, seed=seed),
            cache_dir=cache_dir,
        )
        encoder = load_named(model)
        with _stage_bars() as progress:
            report = run_probe(
                train,
                output,
                encoder,
                val=val_dir,
                test=test_dir,
                settings=settings,
                progress=progress,
            )
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"{encoder.config.name}: {report['counts']['train']} train / {report['counts']['val']} val "
        "/ "
        f"{report['counts']['test']} test images, {len(report['classes'])} classes"
    )
    for name, metrics in report["heads"].items():
        top5 = f", top-5 {metrics['top5']:.3f}" if "top5" in metrics else ""
        chosen = ", ".join(
            f"{k}={v}" for k, v in metrics["chosen"].items() if not isinstance(v, dict)
        )
        typer.echo(
            f"{name:>10}: top-1 {metrics['top1']:.3f}{top5}, balanced "
            f"{metrics['balanced_accuracy']:.3f} "
            f"({chosen})"
        )
    typer.echo(f"wrote {output / 'metrics.json'}")


@contextlib.contextmanager
def _stage_bars():
    """One rich progress bar per stage on stderr (features of each split, then each head's fit);
    yields the `progress(stage, done, total)` callback `probe()` calls."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("{task.description:<18}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bars:
        tasks = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bars.add_task(stage, total=total)
            bars.update(tasks[stage], completed=done, total=total)

        yield update
