"""The `coft` command line: adapt a CLIP model to unlabeled images, and predict with the result."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)


def _class_names(classes: Optional[str], classes_file: Optional[Path]) -> list[str]:
    if (classes is None) == (classes_file is None):
        raise typer.BadParameter("give exactly one of --classes or --classes-file")
    from coft.data import check_class_names

    if classes is not None:
        names = [c.strip() for c in classes.split(",")]
    else:
        names = [line.strip() for line in classes_file.read_text().splitlines()]
    try:
        return check_class_names([n for n in names if n])
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--classes") from error


def _open(images: Path):
    from coft.data import DataError, open_images

    try:
        image_set = open_images(images)
    except DataError as error:
        console.print(f"[red]cannot use {images}: {error}[/red]")
        raise typer.Exit(2) from error
    if image_set.rejected:
        console.print(f"[yellow]skipped {len(image_set.rejected)} unusable file(s):[/yellow]")
        for rejected in image_set.rejected[:20]:
            console.print(f"  {rejected.path}: {rejected.reason}")
        if len(image_set.rejected) > 20:
            console.print(f"  ... and {len(image_set.rejected) - 20} more")
    return image_set


@app.command()
def adapt(
    images: Path = typer.Option(..., "--images", exists=True, help="folder or zip/tar archive of unlabeled images"),
    classes: Optional[str] = typer.Option(None, "--classes", help='comma-separated class names, "a,b,c"'),
    classes_file: Optional[Path] = typer.Option(None, "--classes-file", exists=True, help="one class name a line"),
    method: str = typer.Option("coft", "--method", help="zero-shot | coft | coft+"),
    model: str = typer.Option("proxy", "--model", help="open_clip model: ViT-B-16, local-dir:PATH, hf-hub:ORG/REPO"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip pretrained tag or checkpoint file"),
    template: Optional[str] = typer.Option(None, "--template", help="zero-shot template with {} for the class name "
                                           '(default "a photo of a {}.")'),
    seed: Optional[int] = typer.Option(None, "--seed", help="default: the config file's seed, else 0"),
    config_file: Optional[Path] = typer.Option(None, "--config", exists=True, help="JSON overrides of the method config"),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="resume an interrupted run from here"),
    evaluate: Optional[Path] = typer.Option(None, "--eval", exists=True,
                                            help="labelled holdout (class-name folders) to report true accuracy"),
    descriptions_file: Optional[Path] = typer.Option(
        None, "--descriptions", exists=True,
        help='JSON {"class": ["sentence", ...]}: prompts for the initial pseudo-labels (default for coft+: '
             "the LLM at COFT_LLM_BASE_URL if set, else the template ensemble)"),
    shots: Optional[Path] = typer.Option(None, "--shots", exists=True,
                                         help="labelled shots (class-name folders), trained on with their labels"),
    device: Optional[str] = typer.Option(None, "--device", help="cuda, cpu, ... (default: cuda when available)"),
    out: Path = typer.Option(..., "--out", help="directory to write the classifier artifact to"),
) -> None:
    """Adapt a CLIP model to CLASSES using unlabeled IMAGES; write a classifier artifact."""
    import torch

    from coft.config import CoFTConfig, check_template
    from coft.data import DataError, open_labelled_images
    from coft.descriptions import DescriptionError, LLMEndpoint, load_descriptions
    from coft.pipeline import METHODS, LabelledImages
    from coft.pipeline import adapt as run_adapt

    if method not in METHODS:
        raise typer.BadParameter(f"choose one of {', '.join(METHODS)}", param_hint="--method")
    names = _class_names(classes, classes_file)
    try:
        overrides = json.loads(config_file.read_text()) if config_file else {}
    except ValueError as error:
        raise typer.BadParameter(f"not valid JSON: {error}", param_hint="--config") from error
    if not isinstance(overrides, dict):
        raise typer.BadParameter("must be a JSON object", param_hint="--config")
    if seed is not None:  # an explicit --seed wins over the file's; the default must not
        overrides["seed"] = seed
    if template is not None:
        try:
            overrides.setdefault("pseudo_labels", {})["template"] = check_template(template)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--template") from error
    try:
        config = CoFTConfig.from_dict(overrides)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--config") from error
    descriptions = None
    if descriptions_file is not None:
        try:
            descriptions = load_descriptions(descriptions_file, names)
        except DescriptionError as error:
            raise typer.BadParameter(str(error), param_hint="--descriptions") from error
    image_set = _open(images)

    def labelled_set(path: Path) -> LabelledImages:
        try:
            labelled = open_labelled_images(path, class_names=names)
        except DataError as error:
            console.print(f"[red]cannot use {path}: {error}[/red]")
            raise typer.Exit(2) from error
        to_job = [names.index(labelled.class_names[label]) for label in labelled.labels]
        return LabelledImages(labelled.images, torch.tensor(to_job, dtype=torch.long))

    evaluation = labelled_set(evaluate) if evaluate is not None else None
    labelled_shots = labelled_set(shots) if shots is not None else None

    console.print(f"adapting [bold]{model}[/bold] to {len(names)} classes with {method} "
                  f"on {len(image_set)} images")
    with _progress_bar() as bar:
        task = bar.add_task("starting", total=1.0)

        def on_progress(event) -> None:
            bar.update(task, completed=event.fraction, description=f"{event.stage}: {event.message}")

        try:
            result = run_adapt(image_set, names, method=method, model=model, pretrained=pretrained, config=config,
                               progress=on_progress, checkpoint_dir=checkpoint_dir, evaluation=evaluation,
                               device=device, descriptions=descriptions, llm=LLMEndpoint.from_env(),
                               labelled_shots=labelled_shots)
        except ValueError as error:
            console.print(f"[red]{error}[/red]")
            raise typer.Exit(2) from error
    result.classifier.save(out)
    _print_summary(result.metrics)
    console.print(f"classifier written to [bold]{out}[/bold]")


@app.command()
def predict(
    classifier: Path = typer.Option(..., "--classifier", exists=True, file_okay=False, help="artifact directory"),
    images: Path = typer.Option(..., "--images", exists=True, help="folder or zip/tar archive of images"),
    out: Path = typer.Option(..., "--out", help="CSV file: path,label,probability"),
    batch_size: int = typer.Option(64, "--batch-size"),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Label IMAGES with a classifier written by `coft adapt` (or exported by the service)."""
    from coft.classifier import Classifier

    try:
        model = Classifier.load(classifier, device=device)
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error
    image_set = _open(images)
    predictions = model.predict(image_set, batch_size=batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "probability"])
        for name, label, probability in zip(image_set.names, predictions.labels, predictions.confidences):
            writer.writerow([name, label, f"{probability:.6f}"])
    console.print(f"{len(image_set)} predictions written to [bold]{out}[/bold]")


@app.command()
def export(
    classifier: Path = typer.Option(..., "--classifier", exists=True, file_okay=False, help="artifact directory"),
    format: str = typer.Option("onnx", "--format", help="onnx"),
    out: Path = typer.Option(..., "--out", help="directory for ensemble.onnx and member-{i}.onnx"),
) -> None:
    """Export a classifier for other runtimes: ONNX files of the ensemble and of each member, with the
    preprocessing and class names in their metadata."""
    from coft.classifier import Classifier
    from coft.export import export_onnx

    if format != "onnx":
        console.print(f"[red]unknown format {format!r}: onnx is the one there is[/red]")
        raise typer.Exit(2)
    try:
        model = Classifier.load(classifier, device="cpu")
    except ValueError as error:
        console.print(f"[red]{error}[/red]")
        raise typer.Exit(2) from error
    for path in export_onnx(model, out):
        console.print(f"wrote [bold]{path}[/bold]")


def _progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console)


def _print_summary(metrics: dict) -> None:
    keys = ["prompt_source", "prompt_fallback_reason", "labelled_shots", "s_star_size", "clean_fraction_model1",
            "clean_fraction_model2", "agreement", "prediction_entropy"]
    for key in keys:
        if key in metrics:
            value = metrics[key]
            console.print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    for name, accuracy in metrics.get("accuracy", {}).items():
        console.print(f"  accuracy {name}: {accuracy:.3f}")


if __name__ == "__main__":
    app()
