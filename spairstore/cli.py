"""The ``spairstore`` command line (typer). Each command is a thin layer over the Python API."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import SpairstoreError

app = typer.Typer(
    help="Semantic-correspondence datasets (SPair-71k, PF-PASCAL, PF-WILLOW) in one fast, checksummed store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create; must not exist or be empty.")],
    images_per_category: Annotated[int, typer.Option(help="Images per category; 100 gives the full "
                                                           "SPair-71k scale (1,800 images, ~71k pairs).")] = 12,
    categories: Annotated[Optional[str], typer.Option(help="Comma-separated subset of the 18 categories.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same bytes.")] = 0,
) -> None:
    """Write a synthetic dataset in the native SPair-71k layout (images, masks, annotations, pairs, layouts)."""
    from .synth import synthesize

    cats = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    summary = synthesize(out_dir, images_per_category=images_per_category, categories=cats, seed=seed,
                         progress=True)
    typer.echo(str(summary))


@app.command()
def pack(
    src: Annotated[Path, typer.Argument(help="Dataset root in its native layout (e.g. SPair-71k/).")],
    out: Annotated[Path, typer.Argument(help="Store to write (.h5).")],
    size: Annotated[int, typer.Option(help="Side of the square letterboxed pixels and masks, in store pixels.")] = 512,
    dataset: Annotated[Optional[str], typer.Option(help="Source layout; detected when omitted.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing OUT once the new store is complete.")] = False,
    on_error: Annotated[str, typer.Option(help="fail: stop at the first bad source file; skip: leave bad "
                                               "images and pairs out, listing each with its reason.")] = "fail",
    resume: Annotated[bool, typer.Option(help="Continue an interrupted pack of the same SRC and options "
                                              "into OUT from its staging folder (.OUT.staging/).")] = False,
) -> None:
    """Pack a dataset folder into one store: decoded, letterboxed pixels and masks, original bytes,
    annotations, pair tables and a SHA-256 manifest of every source file. A killed pack leaves the
    old OUT (or none); --resume continues it."""
    import warnings

    from PIL import Image

    from .writer import pack as pack_

    # In this process a would-be decompression bomb is an error, not a warning, whatever its size.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    typer.echo(str(pack_(src, out, size=size, dataset=dataset, overwrite=overwrite, progress=True,
                         on_error=on_error, resume=resume)))  # type: ignore[arg-type]


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def store_info(path: Path) -> dict:
    """Everything ``spairstore info`` shows, as JSON-able data."""
    from .reader import open as open_store

    with open_store(path) as s:
        counts = {split: {"pairs": s.pairs(split).rows,
                          "images": int(((s.images.splits >> j) & 1).sum())} for j, split in enumerate(s.splits)}
        per_cat = {c: {"images": int((s.images.category == k).sum()),
                       **{split: int((s.pairs(split).category == k).sum()) for split in s.splits}}
                   for k, c in enumerate(s.categories)}
        return {
            "path": str(s.path),
            "format": s.attrs["format"],
            "format_version": s.attrs["format_version"],
            "dataset": s.dataset,
            "created_by": s.attrs.get("created_by"),
            "image_size": s.image_size,
            "images": len(s),
            "file_bytes": s.path.stat().st_size,
            "field_bytes": s.field_bytes(),
            "splits": counts,
            "categories": per_cat,
            "build_config": s.attrs.get("build_config"),
            "notes": s.attrs.get("notes", []),
            "manifest_files": s.manifest.rows,
        }


@app.command()
def info(
    store: Annotated[Path, typer.Argument(help="Store to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Describe a store: format, dataset, sizes per field, counts per split and category, build config."""
    d = store_info(store)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    out = [
        f"{d['path']}",
        f"  format       {d['format']} {d['format_version']} ({d['created_by']})",
        f"  dataset      {d['dataset']}, {d['images']:,} images at {d['image_size']}x{d['image_size']}, "
        f"{_mib(d['file_bytes'])} on disk",
        f"  source files {d['manifest_files']:,} in the manifest",
        "  splits       " + "; ".join(f"{k}: {v['pairs']:,} pairs, {v['images']:,} images"
                                      for k, v in d["splits"].items()),
        "  fields",
    ]
    big = sorted(d["field_bytes"].items(), key=lambda kv: -kv[1])
    out += [f"    {k:<28} {_mib(v):>12}" for k, v in big if v >= 2**20 or k.startswith("images/")][:12]
    splits = list(d["splits"])
    out.append("  per category " + " ".join(f"{h:>8}" for h in ["images", *splits]))
    for c, v in d["categories"].items():
        out.append(f"    {c:<11}" + " ".join(f"{v[h]:>8,}" for h in ["images", *splits]))
    out.append("  build        " + json.dumps(d["build_config"]))
    out += [f"  note         {n}" for n in d["notes"]]
    typer.echo("\n".join(out))


@app.command()
def verify(
    store: Annotated[Path, typer.Argument(help="Store to check.")],
    sources: Annotated[Optional[Path], typer.Option(help="Dataset root: also compare every source file's "
                                                         "SHA-256 with the store's manifest.")] = None,
    sample: Annotated[Optional[float], typer.Option(help="Check only this random fraction (0-1] of the "
                                                         "records and source files.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the --sample draw.")] = None,
) -> None:
    """Check every payload record's CRC-32, every table's CRC-32 and (with --sources) every source file's
    SHA-256; name each record or file that differs. Exit code 1 on any difference."""
    from .verify import verify as verify_

    report = verify_(store, sources=sources, sample=sample, seed=seed, progress=True)
    typer.echo(str(report))
    if not report.ok:
        raise SpairstoreError(f"{report.path}: {len(report.differences):,} records, tables or files differ "
                              "(listed above)")


def main() -> None:
    """Console entry point: user errors print one line and exit 1, without a traceback."""
    try:
        app()
    except SpairstoreError as e:
        # Start on a fresh line: an interrupted progress bar leaves the cursor mid-line.
        typer.secho(f"\nerror: {e}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
