"""Protocol sensitivity: the same predictions scored under each published PCK convention, one row each.

A gap between two papers' numbers is partly convention. :func:`sensitivity_table` starts from a base
protocol (the store's default) and changes one convention per row -- comparison ``<`` instead of ``<=``,
the source (query) bbox as threshold base, the squashed-square frame, GeoAware-SC's 20 pairs per category
drawn with replacement -- and shows, per row, PCK per image, per point and as the unweighted category mean.
Every row carries its protocol line. Predictions are made (or read) once, for every pair of the split.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Any

from ..core.tables import markdown_table, text_table
from ..store.reader import Store
from .evaluation import Predictions, Report, score, select_pairs, table_split
from .predictions import all_predictions
from .protocols import Protocol, alpha_key, get_protocol

#: Column aggregations: per image, per point, unweighted mean over categories of per-image PCK.
COLUMNS = ("per_image", "per_point", "category_mean")


def conventions(base: Protocol) -> list[tuple[str, Protocol]]:
    """(what changes, protocol) rows: the base, then one published convention changed at a time."""
    both = ("per_image", "per_point")
    rows = [("base", base.replace(aggregation=both))]
    if base.comparison != "<":
        rows.append(("strict <", base.replace(comparison="<", aggregation=both)))
    if base.threshold == "bbox":
        rows.append(("source bbox", base.replace(threshold="query-bbox", aggregation=both)))
    if base.frame != "square":
        rows.append(("squashed frame", base.replace(frame="square", square_side=None, aggregation=both)))
    rows.append(("20 pairs/category, with replacement (GeoAware-SC)",
                 base.replace(subsample=20, seed=42, sampling="geoaware-sc", aggregation=both)))
    return rows


@dataclass
class SensitivityTable:
    """Rows of (what changed, protocol, report) over the same predictions."""

    split: str
    rows: list[tuple[str, Protocol, Report]]

    def to_dict(self) -> dict[str, Any]:
        """``{"split", "rows": [{"change", "protocol_line", "protocol", "pairs", "pck": {alpha: {column: %}}}]}``."""
        out = []
        for change, proto, rep in self.rows:
            d = rep.to_dict()
            pck = {alpha_key(a): {"per_image": d["pck"][alpha_key(a)]["per_image"],
                                  "per_point": d["pck"][alpha_key(a)]["per_point"],
                                  "category_mean": d["category_mean"][alpha_key(a)]["per_image"]}
                   for a in proto.alphas}
            out.append({"change": change, "protocol_line": str(proto), "protocol": proto.to_dict(),
                        "pairs": rep.pairs, "pck": pck})
        return {"split": self.split, "rows": out}

    def _table(self) -> tuple[str, list[tuple[str, str]], list[tuple[str, list[float | None]]]]:
        d = self.to_dict()
        alphas = list(d["rows"][0]["pck"]) if d["rows"] else []
        cols = [(f"PCK@{a}", c.replace("_", " ")) for a in alphas for c in COLUMNS] + [("", "pairs")]
        rows = [(r["change"], [r["pck"][a][c] for a in alphas for c in COLUMNS] + [r["pairs"]]) for r in d["rows"]]
        return f"Protocol sensitivity ({self.split}): PCK (%) of the same predictions", cols, rows

    def to_text(self) -> str:
        lines = [text_table(*self._table()), ""]
        lines += [f"{change}: {proto}" for change, proto, _ in self.rows]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        return "\n".join([markdown_table(*self._table()), ""] + [f"- {c}: `{p}`" for c, p, _ in self.rows])

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["change", "alpha", "aggregation", "pck", "pairs", "protocol_line"])
        for r in self.to_dict()["rows"]:
            for a, cells in r["pck"].items():
                for c, v in cells.items():
                    w.writerow([r["change"], a, c, "" if v is None else repr(v), r["pairs"], r["protocol_line"]])
        return buf.getvalue()

    def render(self, fmt: str = "text") -> str:
        renderers = {"text": self.to_text, "markdown": self.to_markdown, "csv": self.to_csv,
                     "json": lambda: json.dumps(self.to_dict(), indent=2)}
        if fmt not in renderers:
            raise ValueError(f"unknown format {fmt!r} (one of {', '.join(renderers)})")
        return renderers[fmt]()

    def __str__(self) -> str:
        return self.to_text()

    def __repr__(self) -> str:
        return f"<SensitivityTable {self.split}: {', '.join(change for change, _, _ in self.rows)}>"

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def sensitivity_table(store: Store, split: str, predictions: Predictions,
                      protocol: str | Protocol | None = None) -> SensitivityTable:
    """Score ``predictions`` (see :func:`~spairstore.eval.evaluation.evaluate`) under each row of
    :func:`conventions` of ``protocol`` (default: the store's dataset's)."""
    base = get_protocol(protocol, store.dataset)
    split = table_split(store, split, base)
    pred = all_predictions(store, split, predictions, base.direction)
    rows = []
    for change, proto in conventions(base):
        picked = select_pairs(store, split, proto)
        rows.append((change, proto, score(store, split, picked, pred[picked], proto)))
    return SensitivityTable(split, rows)
