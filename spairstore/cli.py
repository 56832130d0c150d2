"""The ``spairstore`` command line (typer). Each command is a thin layer over the Python API."""
from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from .core.errors import NotAStore, SpairstoreError
from .core.tables import brief, mib

if TYPE_CHECKING:
    from .eval.methods import Method

app = typer.Typer(
    help="Semantic-correspondence datasets (SPair-71k, PF-PASCAL, PF-WILLOW, AP-10K) in one fast, checksummed store.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # click's plain help: flags read --overwrite / --no-overwrite, with no <bool> value
)


def _print_version(value: bool) -> None:
    if value:
        from .core.version import __version__

        typer.echo(f"spairstore {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Semantic-correspondence datasets (SPair-71k, PF-PASCAL, PF-WILLOW, AP-10K) in one fast, checksummed store."""


def _deprecated(old: str, new: str) -> None:
    """One line on stderr for an option spelling kept for old scripts."""
    typer.secho(f"warning: {old} is deprecated here; use {new}", err=True, fg=typer.colors.YELLOW)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to create; must not exist or be empty.")],
    dataset: Annotated[str, typer.Option(help="Layout to write: spair71k or ap10k (AP-10K as GeoAware-SC "
                                              "builds it).")] = "spair71k",
    images_per_category: Annotated[Optional[int], typer.Option(
        help="Images per category (AP-10K: per species); default 12 for SPair-71k (100 gives its full "
             "scale: 1,800 images, ~71k pairs), 60 for AP-10K.")] = None,
    categories: Annotated[Optional[str], typer.Option(help="Comma-separated subset of the categories (SPair-71k's "
                                                           "18; AP-10K: species, e.g. cat,lion,wolf).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same bytes.")] = 0,
    unseen: Annotated[bool, typer.Option("--unseen", help="Also write an SPair-U layer (ExtraImageAnnotation/, "
                                         "ExtraPairAnnotation/test/): new keypoints on the same images.")] = False,
) -> None:
    """Write a synthetic dataset in a native layout: SPair-71k (images, masks, annotations, pairs, layouts)
    or AP-10K (images, COCO-style annotations, the pair files of each subset)."""
    from .sources import SYNTHESIZERS

    if dataset not in SYNTHESIZERS:
        raise SpairstoreError(f"--dataset must be one of {', '.join(SYNTHESIZERS)}, not {dataset!r}")
    cats = _names(categories)
    size = {} if images_per_category is None else {"images_per_category": images_per_category}
    if unseen:
        if dataset != "spair71k":
            raise SpairstoreError("--unseen (an SPair-U layer) applies to --dataset spair71k only")
        size["unseen"] = True
    summary = SYNTHESIZERS[dataset](out_dir, categories=cats, seed=seed, progress=True, **size)
    typer.echo(str(summary))


@app.command()
def pack(
    src: Annotated[Path, typer.Argument(help="Dataset root in its native layout (SPair-71k/, PF-PASCAL/, PF-WILLOW/, AP-10K/).")],
    out: Annotated[Path, typer.Argument(help="Store to write: a .h5 file or a .zarr directory.")],
    size: Annotated[int, typer.Option(help="Side of the square letterboxed pixels and masks, in store pixels.")] = 512,
    dataset: Annotated[Optional[str], typer.Option(
        help="Source layout: spair71k, pfpascal, pfwillow or ap10k; detected when omitted.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at OUT once the new store is complete "
                                                 "(anything else at OUT is refused).")] = False,
    format: Annotated[Optional[str], typer.Option(help="hdf5 or zarr; by default the suffix of OUT decides.")] = None,
    shard_mb: Annotated[float, typer.Option(help="Zarr only: shard size of pixels, masks and features, MiB.")] = 64,
    on_error: Annotated[str, typer.Option(help="fail: stop at the first bad source file; skip: leave bad "
                                               "images and pairs out, listing each with its reason.")] = "fail",
    resume: Annotated[bool, typer.Option(help="HDF5: continue an interrupted pack of the same SRC and options "
                                              "into OUT from its staging folder (.OUT.pack.staging/).")] = False,
    follow_links: Annotated[bool, typer.Option("--follow-links", help="Also pack files that symbolic links "
                                               "lead to outside SRC (by default each is a bad item).")] = False,
    categories: Annotated[Optional[str], typer.Option(
        help="Comma-separated categories to pack (e.g. cat,dog), with the pairs between their images; "
             "default: all.")] = None,
) -> None:
    """Pack a dataset folder into one store: decoded, letterboxed pixels and masks, original bytes,
    annotations, pair tables and a SHA-256 manifest of every source file. A killed pack leaves the
    old OUT (or none); --resume continues it."""
    import warnings

    from PIL import Image

    from .sources import pack as pack_
    from .store.backends import backend_for

    # In this process a would-be decompression bomb is an error, not a warning, whatever its size.
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    try:
        resumable = backend_for(out, format).resumable
    except SpairstoreError:
        resumable = False  # pack says what is wrong with OUT
    state = "is unchanged" if out.exists() else "was not written"
    kept = (f"{out} {state}; the images packed so far are kept: run the same command with --resume "
            "to continue" if resumable else f"{out} {state} (a Zarr pack starts over)")
    with _on_interrupt(kept):
        summary = pack_(src, out, size=size, dataset=dataset, overwrite=overwrite, progress=True, format=format,
                        shard_bytes=_shard_bytes(shard_mb), on_error=on_error, resume=resume,  # type: ignore[arg-type]
                        follow_links=follow_links, categories=_names(categories))
    typer.echo(str(summary))


def _subset_of(build: dict | None) -> str:
    """`` (only cat, dog: pack --categories)`` for a store packed so, else nothing."""
    cats = (build or {}).get("categories")
    return f" (only {', '.join(cats)}: pack --categories)" if isinstance(cats, list) else ""


def _names(listed: str | None) -> list[str] | None:
    """A comma-separated ``--categories`` as a list (None: not given)."""
    return [c.strip() for c in listed.split(",") if c.strip()] if listed else None


def _shard_bytes(shard_mb: float) -> int:
    if shard_mb <= 0:
        raise SpairstoreError(f"--shard-mb must be positive, got {shard_mb}")
    return max(1, int(shard_mb * 2**20))


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Store to read: .h5 file, .zarr directory or Zarr URL.")],
    dst: Annotated[Path, typer.Argument(help="Store to write: a .h5 file or a .zarr directory.")],
    format: Annotated[Optional[str], typer.Option(help="hdf5 or zarr; by default the suffix of DST decides.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing store at DST once the copy is complete "
                                                 "(anything else at DST is refused); its feature sets of the "
                                                 "same images that SRC lacks are kept.")] = False,
    shard_mb: Annotated[float, typer.Option(help="Zarr only: shard size of pixels, masks and features, MiB.")] = 64,
) -> None:
    """Copy a store into another format (HDF5 <-> Zarr), losslessly: every array and attribute equal."""
    from .store.convert import convert as convert_

    before = f"{dst} is unchanged" if dst.exists() else f"{dst} was not written"
    with _on_interrupt(f"{before}; nothing of the copy was kept (a convert starts over)"):
        summary = convert_(src, dst, format=format, overwrite=overwrite, shard_bytes=_shard_bytes(shard_mb),
                           progress=True)
    typer.echo(str(summary))


@app.command()
def features(
    ctx: typer.Context,
    store: Annotated[Path, typer.Argument(help="Store to add the feature set to (.h5 file or .zarr directory).")],
    backbone: Annotated[str, typer.Option(help="efficientnet-lite0 (weights ship with spairstore: works offline), "
                                               "resnet50, resnet101, dinov2-vit{s,b,l,g}14[-reg], "
                                               "dinov3-vit{s,b,l}16; or your own network as MODULE:FACTORY "
                                               "(pkg.mod:make or path/to/file.py:make).")]
    = "efficientnet-lite0",
    layers: Annotated[Optional[str], typer.Option(
        help="Comma-separated layers to tap: unit indices (ResNets: HPF hyperpixel ids, 0 = stem) or module "
             "names (e.g. layer3, _blocks.10, encoder.layer.11, layernorm). All are resampled onto the finest "
             "tapped grid and concatenated. Default: the backbone's.")] = None,
    input_size: Annotated[Optional[int], typer.Option(
        help="Side the S x S store frame is resized to before the backbone, in pixels; a multiple of 32 "
             "(CNNs), 14 (DINOv2) or 16 (DINOv3). Default: S rounded down to one.")] = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 16,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when available).")] = None,
    weights: Annotated[Optional[str], typer.Option(
        help="Weights file (.pth), or for DINOv2/v3 a Hugging Face model folder. Default: the shipped or "
             "cached weights; 'random' builds the architecture with seeded random weights (pipeline tests "
             "only).")] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Feature set name (default: the backbone's; MODULE:FACTORY gives <module>.<factory>).")] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing feature set of this name, and discard an unfinished run of it made with "
             "other settings.")] = False,
    flip: Annotated[bool, typer.Option(
        help="Also store the maps of every image mirrored left to right, as the set NAME-flip "
             "(an existing NAME made with the same settings is kept: only the companion is extracted).")] = False,
    drop: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME", help="Delete feature set NAME instead (repeatable; a NAME-flip companion is a set of its "
                             "own), or the file of a set the store refuses; nothing else of the store changes.")]
    = None,
) -> None:
    """Run a backbone over every image of a store and add its float16 feature maps (N, C, h, w) as a named
    feature set. An interrupted run leaves the store readable without the set; running the same command
    again resumes it. Several processes: `torchrun --nproc-per-node N -m spairstore features STORE ...`
    (one per GPU, or CPU processes); each extracts a share of the images. `--drop NAME` deletes a set."""
    from .features import drop_feature_set, extract_features

    if drop:
        given = [f"--{k.replace('_', '-')}" for k in ctx.params if k not in ("store", "drop")
                 and ctx.get_parameter_source(k).name == "COMMANDLINE"]  # by name: typer ships its own click
        if given:
            raise SpairstoreError(f"--drop deletes feature sets; it takes no other option (got {', '.join(given)})")
        for set_name in drop:
            freed = drop_feature_set(store, set_name)
            typer.echo(f"dropped feature set {set_name!r} from {store} ({mib(freed)} freed)")
        return
    layer_list = [x.strip() for x in layers.split(",") if x.strip()] if layers else None
    with _on_interrupt(f"{store} is unchanged; the maps extracted so far are kept: run the same command "
                       "again to resume"):
        summary = extract_features(store, backbone=backbone, layers=layer_list, input_size=input_size,
                                   batch_size=batch_size, device=device, weights=weights, name=name,
                                   overwrite=overwrite, progress=True, flip=flip)
    if _first_process():
        typer.echo(str(summary))


def _first_process() -> bool:
    """Not one of torchrun's other processes (they stay quiet: the first reports for the run)."""
    return os.environ.get("RANK", "0") == "0"


def store_info(path: Path | str) -> dict:
    """Everything ``spairstore info`` shows, as JSON-able data (``file_bytes`` is None for a URL)."""
    from .core.schema import field_of_array
    from .features import partial_feature_sets
    from .store.backends import disk_bytes, format_of, is_url
    from .store.reader import open as open_store

    with open_store(path) as s:
        sizes = s.field_bytes()
        subsets = s.attrs.get("subset_names", [])
        counts = {split: {"pairs": s.pairs(split).rows, "images": int(((s.images.splits >> j) & 1).sum()),
                          **({"subsets": {n: int((s.pairs(split).subset == k).sum()) for k, n in enumerate(subsets)}}
                             if subsets else {})}
                  for j, split in enumerate(s.splits)}
        per_cat = {c: {"images": int((s.images.category == k).sum()),
                       **{split: int((s.pairs(split).category == k).sum()) for split in s.splits}}
                   for k, c in enumerate(s.categories)}
        return {
            "path": str(s.path),
            "format": s.attrs["format"],
            "backend": format_of(s.path),
            "format_version": s.attrs["format_version"],
            "dataset": s.dataset,
            "created_by": s.attrs.get("created_by"),
            "image_size": s.image_size,
            "images": len(s),
            "file_bytes": None if is_url(s.path) else disk_bytes(s.path),
            "field_bytes": sizes,
            "fields": {f: n for k, n in sizes.items() if (f := field_of_array(k))},  # by the names read() takes
            "splits": counts,
            "categories": per_cat,
            "category_groups": s.attrs.get("category_groups", {}),
            "pair_list_sha256": s.attrs.get("pair_list_sha256", {}),
            "build_config": s.attrs.get("build_config"),
            "notes": s.attrs.get("notes", []),
            "skipped": s.attrs.get("skipped", []),
            "manifest_files": s.manifest.rows,
            "feature_sets": {k: {**v, "bytes": sizes[f"features/{k}/data"]} for k, v in s.feature_sets.items()},
            "incomplete_feature_sets": {} if is_url(s.path) else partial_feature_sets(s.path),
            "refused_feature_sets": s.stale_feature_sets,
            "misplaced_feature_sets": {k: str(v) for k, v in s.misplaced_feature_sets().items()},
        }


@app.command()
def info(
    store: Annotated[str, typer.Argument(help="Store to describe: .h5 file, .zarr directory or Zarr URL.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    skipped: Annotated[bool, typer.Option("--skipped", help="List every source item pack --on-error skip "
                                                            "left out, with its file and reason.")] = False,
) -> None:
    """Describe a store: format, dataset, sizes per field, counts per split and category, build config,
    notes, and what pack left out."""
    from .core.records import Skipped, report_skipped
    from .store.feature_sets import sidecar_dir

    d = store_info(store)
    if as_json:
        typer.echo(json.dumps(d, indent=2))
        return
    from .core.schema import field_of_array
    from .eval.provenance import untrained

    left_out = [Skipped.from_json(x) for x in d["skipped"]]
    if skipped:
        typer.echo("\n".join(map(str, left_out)) if left_out else f"{d['path']}: pack left nothing out")
        return
    out = [
        f"{d['path']}",
        f"  format       {d['format']} {d['format_version']} in {d['backend']} ({d['created_by']})",
        f"  dataset      {d['dataset']}{_subset_of(d['build_config'])}, {d['images']:,} images at "
        f"{d['image_size']}x{d['image_size']}" + ("" if d["file_bytes"] is None else f", {mib(d['file_bytes'])} on disk"),
        f"  source files {d['manifest_files']:,} in the manifest",
        "  splits       " + "; ".join(f"{k}: {v['pairs']:,} pairs, {v['images']:,} images"
                                      for k, v in d["splits"].items()),
        *(f"  subsets      {k}: " + ", ".join(f"{n} {c:,}" for n, c in v["subsets"].items())
          for k, v in d["splits"].items() if "subsets" in v),
        *(f"  pair list    {k} sha256 {h}" for k, h in d["pair_list_sha256"].items()),
        *(f"  groups       {g}: {len(set(v))} groups of the {len(v)} categories ({', '.join(sorted(set(v)))})"
          for g, v in d["category_groups"].items()),
        "  fields",
    ]
    big = sorted(d["field_bytes"].items(), key=lambda kv: -kv[1])
    out += [f"    {field_of_array(k) or k:<36} {mib(v):>12}" for k, v in big
            if v >= 2**20 or k.startswith("images/")][:12]
    splits = list(d["splits"])
    w = max([11, *map(len, d["categories"])])  # PF-WILLOW folders like winebottle(woC) are longer
    out.append(f"  {'per category':<{w + 1}} " + " ".join(f"{h:>8}" for h in ["images", *splits]))
    for c, v in d["categories"].items():
        out.append(f"    {c:<{w}}" + " ".join(f"{v[h]:>8,}" for h in ["images", *splits]))
    for k, v in sorted(d["feature_sets"].items()):  # a set, then its -flip companion
        mirrored = f", of the mirrored images (flip of {v['flip_of']})" if v.get("flipped") else ""
        out.append(f"  features     {k}: {v['backbone']} {','.join(v['layers'])} at {v['input_size']} px, "
                   f"float16 ({v['channels']}, {v['height']}, {v['width']}), stride {v['stride']}, "
                   f"{mib(v['bytes'])}{mirrored}{untrained(v)}")
    for k, v in d["incomplete_feature_sets"].items():
        out.append(f"  features     {k}: INCOMPLETE, {v['done']:,} of {v['images'] or '?'} images extracted "
                   f"({v['resume']} to resume; staged in {v['path']})")
    out += [f"  features     {k}: REFUSED, {why}" for k, why in d["refused_feature_sets"].items()]
    out += [f"  features     {k}: NOT HERE, {p} holds it (made from this store's images: move or copy its folder "
            f"to {sidecar_dir(Path(d['path']))})" for k, p in d["misplaced_feature_sets"].items()]
    out.append("  build        " + json.dumps(d["build_config"]))
    out += [f"  note         {brief(n)}" for n in d["notes"]]
    if left_out:
        out.append(f"  skipped      {len(left_out):,} source items (--skipped lists each)")
        out += [f"    {ln}" for ln in report_skipped(left_out, every=0, examples=1)]
    typer.echo("\n".join(out))


@app.command()
def bench(
    store: Annotated[Path, typer.Argument(help="Store to read.")],
    source: Annotated[Optional[Path], typer.Option(help="The SPair-71k root the store was packed from: adds the "
                                                         "raw-file (JSON + PIL) loader to the comparison.")] = None,
    split: Annotated[str, typer.Option(help="Split whose pairs are sampled.")] = "trn",
    batch_size: Annotated[int, typer.Option(help="Pairs per batch.")] = 32,
    batches: Annotated[int, typer.Option(help="Random batches per timed pass.")] = 16,
    workers: Annotated[int, typer.Option(help="DataLoader workers for the multi-process runs (0: skip them).")] = 2,
    rounds: Annotated[int, typer.Option(help="Timed passes per method; the median is reported.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the random batches.")] = 0,
    device: Annotated[str, typer.Option(help="Where the Loader rows deliver batches: cpu, or cuda (pinned "
                                             "buffers, images normalised on the GPU).")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Time random pair batches (pixels, masks, keypoints) from the store against a plain np.memmap copy
    of the same bytes and, with --source, a raw-file loader; single process and DataLoader workers.
    Also reports a worker's private memory under fork and spawn."""
    from .torch.bench import run

    result = run(store, source, split=split, batch_size=batch_size, batches=batches, workers=workers,
                 rounds=rounds, seed=seed, progress=not as_json, device=device)
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else str(result))


_METHOD_HELP = ("Predictions from a method: identity (the dataset paper's baseline), nn (needs --features), or "
                "your own MODULE:FACTORY (or path/to/file.py:FACTORY) returning a method or a predictor "
                "fn(batch) -> (B, K, 2) target points in store pixels; head:PATH is --head PATH.")
_PROTOCOL_HELP = ("Named protocol: spair, pfpascal, pfwillow, pfwillow-legacy, pfwillow-cats, pfwillow-dhpf, ap10k, "
                  "geoaware, geoaware-sampled (default: the store's dataset's).")


def _protocol(store, protocol, alpha, direction, threshold, comparison, frame, subsample, seed,  # noqa: ANN001, ANN202
              aggregation=None, subset=None, keypoints=None):
    from .eval.protocols import resolve_protocol

    return resolve_protocol(protocol, store.dataset, alphas=alpha, direction=direction, threshold=threshold,
                            comparison=comparison, frame=frame, subsample=subsample, seed=seed,
                            aggregation=aggregation, keypoints=subset, keypoint_set=keypoints)


@app.command("eval")
def eval_(
    store: Annotated[str, typer.Argument(help="Store to evaluate on (path, or URL of a Zarr store).")],
    split: Annotated[str, typer.Option(help="Split whose pairs are evaluated.")] = "test",
    method: Annotated[Optional[str], typer.Option(help=_METHOD_HELP)] = None,
    features: Annotated[Optional[str], typer.Option(help="Feature set of the store for --method nn.")] = None,
    flip: Annotated[str | None, typer.Option(
        help="Test-time flip for nn (needs the feature set <features>-flip): adaptive (GeoAware-SC: masked "
             "nearest-cell distance) or adaptive-mutual (mask-free, mutual nearest neighbours).")] = None,
    predictions: Annotated[Optional[Path], typer.Option(
        help="Predictions file (.npz keyed by pair id, .pt, .npy): keypoints in original pixels of the "
             "image predicted in (the target for src->trg).")] = None,
    head: Annotated[Path | None, typer.Option(
        help="Head file (spairstore.eval.models.save_head, e.g. examples/train_head.py's head.pt): nn on "
             "the maps it makes of its feature set (--features overrides).")] = None,
    protocol: Annotated[Optional[str], typer.Option(help=_PROTOCOL_HELP)] = None,
    alpha: Annotated[Optional[str], typer.Option(help="Override the protocol's alphas, e.g. 0.1,0.05.")] = None,
    direction: Annotated[Optional[str], typer.Option(help="Override: src->trg or trg->src.")] = None,
    threshold: Annotated[Optional[str], typer.Option(
        help="Override the threshold base: bbox, image, kp-extent, kp-extent-padded.")] = None,
    comparison: Annotated[Optional[str], typer.Option(help="Override: <= or <.")] = None,
    frame: Annotated[Optional[str], typer.Option(help="Override: original or square.")] = None,
    subsample: Annotated[Optional[int], typer.Option(help="Evaluate this many random pairs per category.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of --subsample.")] = None,
    aggregation: Annotated[str | None, typer.Option(
        help="Override: per-image, per-point or both (comma-separated; the first is the headline).")] = None,
    subset: Annotated[str | None, typer.Option(
        help="Score only a keypoint subset: geo-aware (GeoAware-SC's geometry-aware keypoints).")] = None,
    keypoints: Annotated[str | None, typer.Option(
        help="Keypoint annotations scored: annotated (default) or unseen (SPair-U's, split <split>-unseen).")] = None,
    dagger: Annotated[bool, typer.Option("--dagger", help="Also report PCK† (correct and nearest to its own "
                                         "true keypoint among the target's annotated ones).")] = False,
    per_keypoint: Annotated[bool, typer.Option("--per-keypoint", help="Also print PCK per category and keypoint "
                                               "slot (with --plot: a heat map beside the plot).")] = False,
    sensitivity: Annotated[bool, typer.Option("--sensitivity", help="Score the predictions under each published "
                                              "convention instead: one row per protocol.")] = False,
    report_format: Annotated[str, typer.Option("--report", help="Report format: text, markdown, csv or json.")] = "text",
    old_format: Annotated[Optional[str], typer.Option("--format", hidden=True, help="Deprecated: --report.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Same as --report json.")] = False,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write the report here, not stdout.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Also save a PCK-vs-alpha and per-category plot (PNG).")] = None,
    save_predictions: Annotated[Optional[Path], typer.Option(
        help="Also write the method's predictions for every pair of the split to this .npz, marked with the "
             "pairs and direction they are for (eval/compare --predictions read it back).")] = None,
    device: Annotated[Optional[str], typer.Option(help="Device for --method nn (default: cuda if available).")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per batch for --method nn.")] = 32,
) -> None:
    """PCK of a method or a predictions file, with the protocol line and the dataset paper's tables: per
    category, by viewpoint/scale/truncation/occlusion, and the controlled analysis (SPair-71k); per group
    the store declares (AP-10K: family, subset)."""
    from .eval.evaluation import evaluate
    from .store.reader import open as open_store

    if head is not None and (predictions is not None or method not in (None, "nn")):
        raise SpairstoreError("--head evaluates nn on the head's maps: drop --predictions and --method")
    if head is None and (method is None) == (predictions is None):
        raise SpairstoreError("give exactly one of --method and --predictions (or --head FILE)")
    if old_format is not None:  # --format is the container format in pack and convert
        _deprecated("eval --format", "--report")
        report_format = old_format
    fmt = "json" if as_json else report_format
    if fmt not in ("text", "markdown", "csv", "json"):
        raise SpairstoreError(f"--report must be text, markdown, csv or json, not {fmt!r}")
    if per_keypoint and fmt == "csv":
        raise SpairstoreError("--per-keypoint adds a table: use --report text, markdown or json with it")
    if sensitivity and (dagger or per_keypoint or plot):
        raise SpairstoreError("--sensitivity makes its own table: leave out --dagger, --per-keypoint and --plot")
    if save_predictions is not None and predictions is not None:
        raise SpairstoreError("--save-predictions writes a method's predictions; --predictions already are a file")
    output = output and _output(output)
    plot = plot and _output(plot, ".png")
    save_predictions = save_predictions and _output(save_predictions, ".npz")
    with open_store(store) as s:
        proto = _protocol(s, protocol, alpha, direction, threshold, comparison, frame, subsample, seed,
                          aggregation, subset, keypoints)
        source = _method(method, features, head, device, batch_size, flip) or predictions
        if save_predictions is not None:  # the method runs once, on every pair; the report scores what was saved
            from .eval.evaluation import table_split
            from .eval.predictions import save_predictions as save

            name = f"{getattr(source, 'name', 'method')}, saved to {save_predictions}"
            source = save(save_predictions, s, table_split(s, split, proto), source, proto.direction)
        if sensitivity:
            from .eval.sensitivity import sensitivity_table

            table = sensitivity_table(s, split, source, proto)
            text = table.render(fmt)
        else:
            report = evaluate(s, split, source, proto, dagger=dagger)
            if save_predictions is not None:
                report.method = name
            text = report.render(fmt)
            if per_keypoint:
                text = (json.dumps({"report": report.to_dict(), "per_keypoint": report.per_keypoint()}, indent=2)
                        if fmt == "json" else f"{text}\n\n{report.per_keypoint_table()}")
    if output:
        output.write_text(text + "\n")
    else:
        typer.echo(text)
    if plot and not sensitivity:
        from .eval.viz import plot_per_keypoint, plot_reports

        plot_reports(report, plot)
        if per_keypoint:
            plot_per_keypoint(report, plot.with_name(f"{plot.stem}-keypoints.png"))


def _method(method: str | None, features: str | None, head: Path | None, device: str | None, batch_size: int = 32,
            flip: str | None = None, progress: bool = True) -> Method | None:
    """The method ``--method``/``--features``/``--head`` name (``--head``: nn on the head's maps of its
    feature set, ``--features`` overriding), or None."""
    from .eval.methods import get_method

    if method is not None and method.startswith("head:"):  # the spelling compare takes
        head, method = Path(method[len("head:"):]), None
    if head is not None:
        return _head_method(head, features, device, batch_size, flip, progress)
    return get_method(method, features, device, batch_size, progress=progress, flip=flip) if method else None


def _head_method(head: Path, features: str | None, device: str | None, batch_size: int, flip: str | None = None,
                 progress: bool = True) -> Method:
    """NN on the maps a trained head file makes of its feature set (``features`` overriding the set)."""
    from .eval.methods import NearestNeighbour
    from .eval.models import load_head

    h = load_head(head)
    return NearestNeighbour(features or h.features, device, batch_size, progress=progress, flip=flip, transform=h)


def _source(spec: str, device: str | None, batch_size: int) -> Method | Path:
    """``identity``, ``nn:FEATURES[:FLIP_RULE]``, ``head:PATH``, a predictions file or ``MODULE:FACTORY``, as
    ``compare`` names A and B."""
    from .eval.methods import get_method

    if spec.startswith("head:"):
        return _head_method(Path(spec[len("head:"):]), None, device, batch_size)
    if spec == "identity" or spec.startswith("nn:"):
        name, _, rest = spec.partition(":")
        feats, _, flip = rest.partition(":")
        return get_method(name, feats or None, device, batch_size, flip=flip or None)
    if Path(spec).is_file():
        return Path(spec)
    if ":" in spec:
        return get_method(spec, None, device, batch_size)
    raise SpairstoreError(f"{spec}: neither a method (identity, nn:FEATURES, head:PATH, MODULE:FACTORY) nor a "
                          "predictions file")


@app.command()
def compare(
    store: Annotated[str, typer.Argument(help="Store to evaluate on (path, or URL of a Zarr store).")],
    a: Annotated[str, typer.Argument(help="A: a predictions file, identity, nn:FEATURES, nn:FEATURES:FLIP_RULE, "
                                          "head:PATH (nn on a trained head's maps, as eval --head) or "
                                          "MODULE:FACTORY.")],
    b: Annotated[str, typer.Argument(help="B: likewise; the report gives A - B.")],
    split: Annotated[str, typer.Option(help="Split whose pairs are evaluated.")] = "test",
    protocol: Annotated[str | None, typer.Option(help=_PROTOCOL_HELP)] = None,
    alpha: Annotated[str | None, typer.Option(help="Override the protocol's alphas, e.g. 0.1,0.05.")] = None,
    aggregation: Annotated[str | None, typer.Option(help="Override: per-image, per-point or both.")] = None,
    subset: Annotated[str | None, typer.Option(help="Score only a keypoint subset: geo-aware.")] = None,
    keypoints: Annotated[str | None, typer.Option(help="annotated (default) or unseen (SPair-U).")] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples of the pairs.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    confidence: Annotated[float, typer.Option(help="Interval, percent.")] = 95.0,
    min_pairs: Annotated[int | None, typer.Option(
        help="Fewest pairs a group needs for an interval and p-value (default 10); smaller groups get the "
             "difference only (the bootstrap of a few pairs cannot show how much they vary).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also save A - B with its intervals, overall and per category (and group), as a PNG.")] = None,
    device: Annotated[str | None, typer.Option(help="Device for nn (default: cuda if available).")] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per batch for nn.")] = 32,
) -> None:
    """PCK of A minus PCK of B on the same pairs -- overall, per category, per group the store declares
    (AP-10K: family, subset) and per variation factor -- with paired bootstrap confidence intervals (pairs
    resampled) and p-values, and each group's pair count."""
    from .eval.compare import compare as run_compare
    from .store.reader import open as open_store

    plot = plot and _output(plot, ".png")
    with open_store(store) as s:
        proto = _protocol(s, protocol, alpha, None, None, None, None, None, None, aggregation, subset, keypoints)
        result = run_compare(s, split, _source(a, device, batch_size), _source(b, device, batch_size), proto,
                             resamples=resamples, seed=seed, confidence=confidence, names=(a, b),
                             min_pairs=min_pairs)
    typer.echo(result.render("json" if as_json else "text"))
    if plot:
        from .eval.viz import plot_comparison

        plot_comparison(result, plot)
        if not as_json:
            typer.echo(f"wrote {plot}")


@app.command()
def stats(
    store: Annotated[str, typer.Argument(help="Store to describe (path, or URL of a Zarr store).")],
    report_format: Annotated[str, typer.Option("--report", help="Report format: text, markdown or json.")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="Same as --report json.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", hidden=True, help="Deprecated: --report markdown.")] = False,
) -> None:
    """Dataset statistics in the dataset paper's layout: pairs per split and difficulty level, pairs per
    category and split, images per split."""
    from .eval.stats import dataset_stats, render_stats
    from .store.reader import open as open_store

    with open_store(store) as s:
        d = dataset_stats(s)
    if markdown:
        _deprecated("stats --markdown", "--report markdown")
        report_format = "markdown"
    fmt = "json" if as_json else report_format
    if fmt not in ("text", "markdown", "json"):
        raise SpairstoreError(f"--report must be text, markdown or json, not {fmt!r}")
    typer.echo(json.dumps(d, indent=2) if fmt == "json" else render_stats(d, fmt))


@app.command()
def show(
    store: Annotated[str, typer.Argument(help="Store holding the pair (path, or URL of a Zarr store).")],
    pair: Annotated[int, typer.Option(help="Pair id (the key within the split).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG to write.")],
    split: Annotated[str, typer.Option(help="Split of the pair.")] = "test",
    method: Annotated[Optional[str], typer.Option(help=_METHOD_HELP)] = None,
    features: Annotated[Optional[str], typer.Option(help="Feature set of the store for --method nn.")] = None,
    predictions: Annotated[Optional[Path], typer.Option(help="Predictions file for the whole split.")] = None,
    head: Annotated[Path | None, typer.Option(
        help="Head file (as for eval --head): nn on the maps it makes of its feature set.")] = None,
    protocol: Annotated[Optional[str], typer.Option(help=_PROTOCOL_HELP)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Alpha of the green/red colouring (default: the "
                                                         "protocol's first).")] = None,
    direction: Annotated[Optional[str], typer.Option(help="src->trg or trg->src.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Device for --method nn.")] = None,
) -> None:
    """Draw a pair side by side with its keypoints; with a method or predictions, match lines are green
    when correct at alpha and red when not. Without either, the ground-truth matches."""
    import numpy as np

    from .eval.predictions import load_predictions
    from .eval.viz import show_pair
    from .store.reader import open as open_store

    if sum(x is not None for x in (method, predictions, head)) > 1:
        raise SpairstoreError("give at most one of --method, --predictions and --head")
    output = _output(output, ".png")
    with open_store(store) as s:
        proto = _protocol(s, protocol, None, direction, None, None, None, None, None)
        row = s.pair_row(split, pair)
        pred, name = None, None
        m = _method(method, features, head, device, progress=False)
        if m is not None:
            pred, name = m(s, split, np.array([row]), proto.direction)[0], m.name
        elif predictions:
            pred, name = load_predictions(predictions, s, split, proto.direction)[row], predictions.name
        alpha = proto.alphas[0] if alpha is None else alpha
        report = show_pair(s, split, row, output, proto, pred, alpha=alpha, method=name)
    typer.echo(f"wrote {output}" + (f" (PCK@{alpha:g}: {report.pck(alpha):.1f}%)" if report else ""))


@app.command()
def verify(
    store: Annotated[str, typer.Argument(help="Store to check: .h5 file, .zarr directory or Zarr URL.")],
    source: Annotated[Optional[Path], typer.Option(help="Dataset root the store was packed from: also compare "
                                                        "every source file's SHA-256 with the store's manifest.")] = None,
    sources: Annotated[Optional[Path], typer.Option(hidden=True, help="Deprecated: --source.")] = None,
    sample: Annotated[Optional[float], typer.Option(help="Check only this random fraction (0-1] of the "
                                                         "records and source files.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the --sample draw.")] = None,
) -> None:
    """Check every payload record's CRC-32, every table's CRC-32 and (with --source) every source file's
    SHA-256; name each record or file that differs. Exit code 1 on any difference."""
    from .store.verify import verify as verify_

    if sources is not None:  # one name with bench's --source
        _deprecated("verify --sources", "--source")
        source = sources
    report = verify_(store, sources=source, sample=sample, seed=seed, progress=True)
    typer.echo(str(report))
    if not report.ok:
        n = len(report.differences)
        raise SpairstoreError(f"{report.path}: " + ("1 record, table or file differs" if n == 1 else
                                                    f"{n:,} records, tables or files differ") + " (listed above)")


def _output(path: Path, suffix: str | None = None) -> Path:
    """Where a command will write ``path`` (with ``suffix`` added if it has none), checked before the work."""
    if suffix and not path.suffix:
        path = path.with_name(path.name + suffix)
    if not path.parent.is_dir():
        raise SpairstoreError(f"{path.parent}: output folder does not exist")
    if not os.access(path.parent, os.W_OK):  # a read-only mount says so before an hour of eval, not after
        raise SpairstoreError(f"{path.parent}: output folder is not writable")
    return path


@contextmanager
def _on_interrupt(kept: str) -> Iterator[None]:
    """Ctrl-C says what of the interrupted work was kept (and how to go on), not just that it stopped."""
    try:
        yield
    except KeyboardInterrupt:
        if _first_process():
            typer.secho(f"\ninterrupted: {kept}", err=True)
        sys.exit(130)


def _error(message: str) -> None:
    if _first_process():  # under torchrun every process raises it; the first names the failed ones
        # Start on a fresh line: an interrupted progress bar leaves the cursor mid-line.
        typer.secho(f"\nerror: {message}", err=True, fg=typer.colors.RED)
    sys.exit(1)


def main() -> None:
    """Console entry point: user errors, and what the machine refuses (a folder that cannot be written, a
    full disk, memory), print one line and exit 1, without a traceback. An error raised in the user's
    code (``--backbone``/``--method MODULE:FACTORY``) shows the traceback from its first frame there."""
    try:
        app()
    except NotAStore as e:  # a dataset folder where a store goes: say what to do with it
        from .sources import dataset_at

        title = dataset_at(e.path) if e.path is not None else None
        _error(str(e) + (f"; it is a {title} dataset folder: pack it first (spairstore pack {e.path} STORE.h5)"
                         if title else ""))
    except SpairstoreError as e:
        _error(str(e))
    except OSError as e:
        from .store.transaction import disk_full

        if disk_full(e):
            where = f"{e.filename}: " if e.filename else ""
            _error(f"{where}no space left on the device; make room and run the command again")
        _error(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else f"{type(e).__name__}: {e}")
    except MemoryError:
        _error("out of memory (the store or the batch is too big for this machine's RAM)")
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        from .core.user_code import raised, user_frames

        frames = user_frames(e)
        if frames is None:  # not from the user's code: spairstore's own bug, shown in full
            raise
        if _first_process():
            typer.echo("\nTraceback (most recent call last; your code's frames only):\n" + "".join(frames.format())
                       + "".join(traceback.format_exception_only(e)), err=True)
        _error(f"your code raised {raised(e)}")
