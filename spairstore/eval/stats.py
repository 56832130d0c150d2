"""Dataset statistics in the dataset paper's layout: ``spairstore stats``.

Table 1: pairs per split and difficulty level (viewpoint, scale, truncation, occlusion; AP-10K's
subsets: intra-species, cross-species, cross-family).
Table 2: pairs per category and split. Both straight from the store's pair tables.
"""
from __future__ import annotations

from typing import Any

from ..core.schema import LEVELS
from ..core.tables import markdown_table, text_table
from ..store.reader import Store


def dataset_stats(store: Store) -> dict[str, Any]:
    """``{"dataset", "categories", "splits": {split: {"pairs", "images", <factor>: {level: n}, "category":
    {name: n}, "subset": {name: n}}}}`` (``subset`` where the dataset has subsets). A factor gets an
    ``unknown`` count only where some pairs lack its label."""
    subsets = list(store.attrs.get("subset_names", []))
    splits: dict[str, Any] = {}
    for j, split in enumerate(store.splits):
        t = store.pairs(split)
        d: dict[str, Any] = {"pairs": t.rows, "images": int(((store.images.splits >> j) & 1).sum())}
        for k, levels in LEVELS.items():
            lab = t[k]
            d[k] = {lv: int((lab == i).sum()) for i, lv in enumerate(levels)}
            if (lab < 0).any():
                d[k]["unknown"] = int((lab < 0).sum())
        d["category"] = {c: int((t.category == i).sum()) for i, c in enumerate(store.categories)}
        if subsets:
            d["subset"] = {n: int((t.subset == i).sum()) for i, n in enumerate(subsets)}
        d["small"] = int(t.small.sum())  # pairs of the dataset's small layout
        splits[split] = d
    return {"dataset": store.dataset, "store": str(store.path), "categories": list(store.categories), "splits": splits}


def _tables(stats: dict[str, Any]) -> list[tuple[str, list[tuple[str, str]], list[tuple[str, list[Any]]]]]:
    splits = stats["splits"]
    names = list(splits)
    total = lambda f: sum(f(s) for s in splits.values())  # noqa: E731
    # Factors no pair is labelled with (e.g. PF datasets) are left out.
    levels = {k: LEVELS[k] for k in LEVELS if any(sum(s[k][lv] for lv in LEVELS[k]) for s in splits.values())}
    if "subset" in splits[names[0]]:
        levels["subset"] = tuple(splits[names[0]]["subset"])
    cols = [("", "pairs"), ("", "images")] + [(k, lv) for k, lvs in levels.items() for lv in lvs]
    rows = [(s, [splits[s]["pairs"], splits[s]["images"]]
             + [splits[s][k][lv] for k, lvs in levels.items() for lv in lvs]) for s in names]
    rows.append(("total", [total(lambda s: s["pairs"]), total(lambda s: s["images"])]
                 + [total(lambda s, k=k, lv=lv: s[k][lv]) for k, lvs in levels.items() for lv in lvs]))
    by = [w for w, has in (("difficulty level", set(levels) - {"subset"}), ("subset", "subset" in levels)) if has]
    t1 = (f"{stats['dataset']}: pairs per split{''.join(f' and {w}' for w in by)} (images: used by the split)",
          cols, rows)
    cols = [("", s) for s in names] + [("", "total")]
    rows = [(c, [splits[s]["category"][c] for s in names] + [total(lambda s, c=c: s["category"][c])])
            for c in stats["categories"]]
    rows.append(("all", [splits[s]["pairs"] for s in names] + [total(lambda s: s["pairs"])]))
    return [t1, (f"{stats['dataset']}: pairs per category and split", cols, rows)]


def render_stats(stats: dict[str, Any], fmt: str = "text") -> str:
    """The two tables as ``text`` or ``markdown``."""
    render = markdown_table if fmt == "markdown" else text_table
    return "\n\n".join(render(*t) for t in _tables(stats))

