"""Command line, curation: curate, relabel, export, similar (registered on cli's group)."""

from __future__ import annotations

import json
import sys

import click

from dinobatch.cli.common import DEVICE_HELP, INPUT_FOLDER, predict_options, run, setup_logging, verbosity
from dinobatch.cli.params import FINITE, FRACTION, MODEL_REF, SECONDS
from dinobatch.config import MODEL_ENV
from dinobatch.curation.reasons import ANY, Reason
from dinobatch.errors import EXIT_THRESHOLD, ConfigError
from dinobatch.io.terminal import printable


def _fail_on(values: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    out = []
    for value in values:
        reason, sep, share = value.partition("=")
        try:
            out.append((reason.strip(), float(share.rstrip("%")) / (100 if share.endswith("%") else 1)))
        except ValueError:
            raise ConfigError(f"--fail-on {value!r}: use REASON=SHARE, e.g. label_error=0.05 or any=10%") from None
        if not sep:
            raise ConfigError(f"--fail-on {value!r}: use REASON=SHARE, e.g. label_error=0.05")
    return tuple(out)


class _CurateCommand(click.Command):
    """curate, whose --help ends with every reason, its score and what it means (curation.reasons)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Reasons (an image's score is its highest; most urgent first)"):
            formatter.write_dl([(r.value, f"{r.scores()}: {r.description}.") for r in Reason])
        super().format_epilog(ctx, formatter)


@click.command(cls=_CurateCommand)
@click.argument("predictions", type=INPUT_FOLDER)
@click.option("--manifest", "manifest_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="The labels people gave (manifest or CSV); without it: confidence, duplicates, outliers.")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False), help="Folder for the queue.")
@click.option("--html", "html_page", is_flag=True, help="Also write review.html (open it from disk).")
@click.option("--low-confidence", type=FRACTION, default=0.5, help="Flag confidence below this.")
@click.option("--rank-by", type=click.Choice(["self_confidence", "normalized_margin"]), default="self_confidence",
              help="Ranking of suspected label errors.")
@click.option("--method", type=click.Choice(["prune_by_noise_rate", "confident_learning"]),
              default="prune_by_noise_rate", help="Confident-learning variant for label errors.")
@click.option("--embedding-duplicate", type=FRACTION, default=0.97,
              help="Cosine similarity from which two embeddings are the same scene.")
@click.option("--outlier-z", type=FINITE, default=3.5, help="Robust z-score from which an image is an outlier.")
@click.option("--max-review", type=click.IntRange(min=0), default=500, show_default=True, metavar="N",
              help="Items the review page shows (a duplicate group is one): the highest scores, each reason's "
                   "best kept; the rest stay in queue.csv marked in_review=False. 0: all.")
@click.option("--fail-on", "fail_on", multiple=True, metavar="REASON=SHARE",
              help="Exit 8 (after writing everything) when the share of images flagged for REASON is above SHARE "
                   f"(0.05 or 5%); repeatable. REASON: {', '.join(Reason)}, or {ANY}.")
@verbosity
def curate(predictions, manifest_path, out, html_page, low_confidence, rank_by, method, embedding_duplicate,
           outlier_z, max_review, fail_on, quiet, verbose) -> None:
    """Write a review queue of what most likely needs a look, from a classify output folder."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.curation.curate import CurateConfig
        from dinobatch.curation.curate import curate as run_curate
        from dinobatch.curation.review import write_outputs
        from dinobatch.schema import Col

        cfg = CurateConfig(predictions=predictions, out=out, manifest=manifest_path, low_confidence=low_confidence,
                           rank_by=rank_by, method=method, embedding_duplicate=embedding_duplicate,
                           outlier_z=outlier_z, max_review=max_review, fail_on=_fail_on(fail_on))
        result = run_curate(cfg)
        paths = write_outputs(result, out, html_page=html_page)
        if not quiet:
            reasons = ", ".join(f"{k} {v}" for k, v in result.counts.items() if v)
            click.echo(f"{result.images} images, {len(result.queue)} to review" + (f": {reasons}" if reasons else ""))
            left = sum(1 for q in result.queue if not q[Col.IN_REVIEW])
            if left:
                click.echo(f"the review page shows the first {max_review} items; {left} flagged files beyond them "
                           "are in queue.csv (in_review=False)")
            click.echo("wrote " + ", ".join(printable(p) for p in paths.values()))
        for breach in result.breaches:
            click.echo(f"dinobatch: threshold passed: {printable(breach)}", err=True)
        if result.breaches:
            sys.exit(EXIT_THRESHOLD)

    run(body)


@click.command()
@click.argument("decisions", type=click.Path(exists=True, dir_okay=False))
@click.option("--manifest", "manifest_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="The manifest to change.")
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="New manifest version [default: MANIFEST.vN.parquet beside it].")
@click.option("--dry-run", is_flag=True, help="Print the changes; write nothing.")
@click.option("--user", default=None, help="Name recorded in the audit log [default: the login name].")
@click.option("--new-label", "new_labels", multiple=True, metavar="LABEL",
              help="A label the manifest does not have yet, allowed in the decisions; repeatable.")
@click.option("--wait", type=SECONDS, default=0.0,
              help="Seconds to wait for another relabel of the same manifest before exiting with code 9.")
@verbosity
def relabel(decisions, manifest_path, out, dry_run, user, new_labels, wait, quiet, verbose) -> None:
    """Apply a CSV of path,action[,label][,note] (keep, relabel, remove) to a manifest."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.curation.relabel import relabel as run_relabel

        done = run_relabel(decisions, manifest_path, out=out, dry_run=dry_run, user=user, new_labels=new_labels,
                           wait=wait)
        if not quiet or dry_run:
            for c in done.changes:
                detail = f" -> {c.new_label}" if c.action == "relabel" else ""
                click.echo(printable(f"{c.action:<8} {c.path}: {c.old_label}{detail}" + (f"  ({c.note})" if c.note else "")))
            outcome = {"dry run": "dry run, nothing written", "written": f"wrote {printable(done.target)}",
                       "finished": f"finished the interrupted run that wrote {printable(done.target)}",
                       "already applied": f"already applied in {printable(done.target)}, nothing written"}
            click.echo(f"{len(done.changes)} decisions; {outcome[done.outcome]}")

    run(body)


@click.command()
@click.argument("predictions", type=INPUT_FOLDER)
@click.option("--to", "to", required=True, type=click.Path(file_okay=False), help="Folder to copy into.")
@click.option("--min-confidence", type=FRACTION, required=True,
              help="Copies at or above this confidence go to TO/<label>/, the rest to TO/_review/.")
@click.option("--copy-outside-links", is_flag=True,
              help="Also copy files that links in the classified folder point to outside it.")
@verbosity
def export(predictions, to, min_confidence, copy_outside_links, quiet, verbose) -> None:
    """Copy (never move) classified images into TO/<label>/ or TO/_review/."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.curation.export import export as run_export

        counts = run_export(predictions, to, min_confidence=min_confidence, outside_links=copy_outside_links)
        if not quiet:
            click.echo(printable(", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "nothing to copy"))

    run(body)


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--model", type=MODEL_REF, envvar=MODEL_ENV, required=True, help=f"Model file [env {MODEL_ENV}].")
@click.option("--reference", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Manifest of labelled reference images.")
@click.option("-k", "--top-k", type=click.IntRange(min=1), default=3, help="Species to list per image.")
@click.option("--neighbours", type=click.IntRange(min=0), default=3, help="Nearest reference images to list.")
@click.option("--species", type=click.Path(dir_okay=False), default=None, help="Species facts CSV.")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder for cached reference embeddings [default: ~/.cache/dinobatch/embeddings].")
@click.option("--device", default="auto", help=DEVICE_HELP)
@predict_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@verbosity
def similar(images, model, reference, top_k, neighbours, species, cache, device, precision, batch_size, workers,
            as_json, quiet, verbose) -> None:
    """Which species each IMAGE (a child's drawing, say) looks like, by embedding similarity."""
    setup_logging(quiet, verbose)

    def body():
        from pathlib import Path

        from dinobatch.curation.similar import similar as run_similar
        from dinobatch.schema import Col

        results = run_similar(list(images), model, reference, top_k=top_k, neighbours=neighbours, device=device,
                              precision=precision, batch_size=batch_size, workers=workers, species_csv=species,
                              cache_dir=Path(cache) if cache else None)
        if as_json:
            click.echo(json.dumps(results, indent=2))
            return
        for r in results:
            if r["error"]:
                click.echo(printable(f"{r['image']}: error: {r['error']}"))
                continue
            best = r["species"][0]
            facts = ", ".join(str(best[k]) for k in (Col.SPECIES_SCIENTIFIC_NAME, Col.SPECIES_PERIOD, Col.SPECIES_DIET)
                              if best.get(k))
            click.echo(printable(f"{r['image']}: looks like {best['label']} ({best['similarity']:.3f})" + (f" - {facts}" if facts else "")))
            for s in r["species"][1:]:
                click.echo(printable(f"    then {s['label']} ({s['similarity']:.3f})"))
            for n in r["nearest"]:
                click.echo(printable(f"    nearest: {n['path']} [{n['label']}] ({n['similarity']:.3f})"))

    run(body)
