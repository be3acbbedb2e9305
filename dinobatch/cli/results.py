"""Command line: results (the current rows of an output folder)."""

from __future__ import annotations

import json

import click

from dinobatch.cli.common import INPUT_FOLDER, run, setup_logging, verbosity
from dinobatch.errors import ConfigError
from dinobatch.io.terminal import printable


@click.command()
@click.argument("folder", type=INPUT_FOLDER)
@click.option("--model", default=None, help="Only this model (a fingerprint or its first characters).")
@click.option("-o", "--out", default=None, type=click.Path(dir_okay=False),
              help="Write the current rows to FILE (.parquet, .csv or .jsonl) instead of printing them.")
@verbosity
def results(folder, model, out, quiet, verbose) -> None:
    """Print or export the current rows of a classify output folder: one per file and model."""
    setup_logging(quiet, verbose)

    def body():
        from dinobatch.io.arrow import write_table
        from dinobatch.io.files import atomic_path, json_plain
        from dinobatch.store.runs import current_rows

        table = current_rows(folder, model)
        if out is None:
            print_rows(table)
            return
        suffix = out.rsplit(".", 1)[-1].lower()
        if suffix == "parquet":
            write_table(table, out)
        elif suffix in ("csv", "jsonl"):
            import pyarrow.csv as pacsv

            with atomic_path(out, "write") as tmp:
                if suffix == "csv":
                    import pyarrow as pa

                    from dinobatch.io.terminal import spreadsheet_safe_column

                    flat = table.drop_columns([c for c in table.column_names
                                               if str(table.schema.field(c).type).startswith(("list", "binary"))])
                    flat = pa.table({c: spreadsheet_safe_column(flat[c]) if pa.types.is_string(flat.schema.field(c).type)
                                     else flat[c] for c in flat.column_names})
                    pacsv.write_csv(flat, tmp)
                else:
                    tmp.write_text("".join(json.dumps(r, default=json_plain) + "\n" for r in table.to_pylist()),
                                   encoding="utf-8")
        else:
            raise ConfigError(f"--out {out}: use a .parquet, .csv or .jsonl file name")
        if not quiet:
            click.echo(f"wrote {table.num_rows} current rows to {printable(out)}")

    run(body)


def print_rows(table) -> None:
    """Tab-separated, under a header, one line per row: names escaped, so a tab or newline in one
    cannot shift a column or split a row."""
    from dinobatch.schema import Col  # here: the schema module loads pyarrow, which --help does not need

    shown = (Col.PATH, Col.STATUS, Col.LABEL, Col.CONFIDENCE)
    click.echo("\t".join((*shown, "detail")))  # detail: duplicate_of or error, whichever the row has
    for r in table.select([*shown, Col.DUPLICATE_OF, Col.ERROR]).to_pylist():
        conf = f"{r[Col.CONFIDENCE]:.3f}" if r[Col.CONFIDENCE] is not None else "-"
        fields = (r[Col.PATH], r[Col.STATUS], r[Col.LABEL] or "-", conf, r[Col.DUPLICATE_OF] or r[Col.ERROR] or "")
        click.echo("\t".join(printable(f) for f in fields))
