"""Pictures: a pair with its matches (``spairstore show``) and PCK plots (``spairstore eval --plot``).

Uses matplotlib's object-oriented API with the Agg canvas only, so it never touches pyplot's global state
(and ``import spairstore`` never imports matplotlib: only this module does).
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg, RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Circle
from PIL import Image

from ..core.tables import ABBREV
from ..store.reader import Store
from .compare import Comparison
from .evaluation import Report, score
from .protocols import Protocol, alpha_key


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def show_pair(store: Store, split: str, row: int, out: str | Path, protocol: Protocol,
              predictions: np.ndarray | None = None, alpha: float | None = None, method: str | None = None,
              height: int = 360) -> Report | None:
    """Draw pair ``row`` of ``split``: the query image left, the image predictions lie in right, both
    original images scaled to ``height``. With ``predictions`` ((n, 2) or (M, 2), original pixels of the
    right image) each match line is green when correct at ``alpha`` (default: the protocol's first) and
    red when not, and each true keypoint gets a circle of radius α·base; without, the ground-truth
    correspondences are drawn. Returns the one-pair report (None without predictions)."""
    t = store.pairs(split)
    forward = protocol.direction == "src->trg"
    a, b = (int(t.src[row]), int(t.trg[row])) if forward else (int(t.trg[row]), int(t.src[row]))
    n = int(t.n_kps[row])
    q_kps = (t.src_kps if forward else t.trg_kps)[row, :n].astype(np.float64)
    true = (t.trg_kps if forward else t.src_kps)[row, :n].astype(np.float64)
    imgs = [Image.open(io.BytesIO(store.image_bytes(i))).convert("RGB") for i in (a, b)]
    s = [height / im.height for im in imgs]
    imgs = [im.resize((max(1, round(im.width * k)), height), Image.Resampling.BILINEAR) for im, k in zip(imgs, s)]
    gap = 10
    canvas = np.full((height, imgs[0].width + gap + imgs[1].width, 3), 255, dtype=np.uint8)
    canvas[:, :imgs[0].width] = np.asarray(imgs[0])
    canvas[:, imgs[0].width + gap:] = np.asarray(imgs[1])
    shift = imgs[0].width + gap
    qa = q_kps * s[0]
    tb = true * s[1] + [shift, 0]

    title = [t.stem[row], f"({store.categories[int(t.category[row])]}, {protocol.direction})"]
    if predictions is None:
        title.append("ground truth")
    else:
        alpha = protocol.alphas[0] if alpha is None else alpha
        proto = protocol if alpha in protocol.alphas else protocol.replace(alphas=(alpha, *protocol.alphas))
        pred = np.full((1, t.kps_ids.shape[1], 2), np.nan)
        pred[0, :n] = np.asarray(predictions, dtype=np.float64)[:n]
        report = score(store, split, np.array([row]), pred, proto, method=method)
        ok = report.correct[proto.alphas.index(alpha), 0, :n]
        title.append(f"{method or 'predictions'}: PCK@{alpha_key(alpha)} = {int(ok.sum())}/{n}")
    lines = _wrap(title, canvas.shape[1])
    top = 14 * len(lines) + 12  # pixels above the images for the title
    fig = _figure(canvas.shape[1] / 100, (canvas.shape[0] + top) / 100)
    ax = fig.add_axes((0, 0, 1, canvas.shape[0] / (canvas.shape[0] + top)))
    ax.imshow(canvas)
    ax.set_axis_off()
    if predictions is None:
        for (x0, y0), (x1, y1) in zip(qa, tb):
            ax.plot([x0, x1], [y0, y1], "-", color="yellow", lw=1.2)
        ax.scatter(qa[:, 0], qa[:, 1], s=18, c="yellow", edgecolors="black", linewidths=0.5, zorder=3)
        ax.scatter(tb[:, 0], tb[:, 1], s=18, c="yellow", edgecolors="black", linewidths=0.5, zorder=3)
        report = None
    else:
        radius = alpha * report.base[0] * s[1]
        pb = pred[0, :n] * s[1] + [shift, 0]
        for i in range(n):
            colour = "lime" if ok[i] else "red"
            ax.add_patch(Circle(tuple(tb[i]), radius, fill=False, color="white", lw=0.8, alpha=0.8))
            ax.plot([qa[i, 0], pb[i, 0]], [qa[i, 1], pb[i, 1]], "-", color=colour, lw=1.4)
        ax.scatter(qa[:, 0], qa[:, 1], s=20, c="white", edgecolors="black", linewidths=0.5, zorder=3)
        ax.scatter(tb[:, 0], tb[:, 1], s=20, c="white", marker="x", zorder=3)
        ax.scatter(pb[:, 0], pb[:, 1], s=22, c=np.where(ok, "lime", "red"), edgecolors="black", linewidths=0.5, zorder=4)
    fig.text(0.5, 1 - 6 / (canvas.shape[0] + top), "\n".join(lines), fontsize=9, ha="center", va="top",
             linespacing=1.3)
    fig.savefig(out)
    return report


def _wrap(parts: list[str], width_px: int, fontsize: float = 9) -> list[str]:
    """The title's parts joined two spaces apart into lines that fit ``width_px`` (measured by Agg; a part
    too long for a line is cut): narrow pictures, e.g. of two portrait images, would otherwise clip it."""
    font, renderer = FontProperties(size=fontsize), RendererAgg(1, 1, 100)

    def fits(text: str) -> bool:
        return renderer.get_text_width_height_descent(text, font, ismath=False)[0] <= width_px - 8

    lines: list[str] = []
    for part in parts:
        while part:
            cut = next((k for k in range(len(part), 0, -1) if fits(part[:k])), 1)
            piece, part = part[:cut], part[cut:]
            if lines and fits(f"{lines[-1]}  {piece}"):
                lines[-1] += "  " + piece
            else:
                lines.append(piece)
    return lines


def plot_reports(reports: Report | Sequence[Report], out: str | Path) -> None:
    """PCK-vs-α curves (every aggregation) and per-category bars at the first α, one series per report."""
    reports = [reports] if isinstance(reports, Report) else list(reports)
    p = reports[0].protocol
    top = max(0.2, 1.5 * max(p.alphas))
    alphas = np.linspace(0, top, 101)
    cats = [c for c in reports[0].categories if reports[0].to_dict()["counts"]["by_category"][c] > 0]
    bars_width = max(2.2, 0.45 * (len(cats) + 1))  # inches; wide enough for its title over few categories
    fig = _figure(5 + bars_width, 4.2)
    ax1, ax2 = fig.add_gridspec(1, 2, width_ratios=(5, bars_width)).subplots()
    style = {"per_image": "-", "per_point": "--"}
    width = 0.8 / len(reports)
    for k, r in enumerate(reports):
        curve = r.curve(alphas)
        label = r.method or f"report {k + 1}"
        for agg in r.protocol.aggregation:
            ax1.plot(alphas, curve[agg], style[agg], color=f"C{k}", label=f"{label}, {agg.replace('_', ' ')}")
        d = r.to_dict()
        a, agg = alpha_key(r.protocol.alphas[0]), r.protocol.aggregation[0]
        vals = [d["by_category"][c][a][agg] or 0.0 for c in cats] + [d["pck"][a][agg] or 0.0]
        ax2.bar(np.arange(len(vals)) + (k - (len(reports) - 1) / 2) * width, vals, width, color=f"C{k}", label=label)
    for a in p.alphas:
        ax1.axvline(a, color="grey", lw=0.6, ls=":")
    ax1.set(xlabel="alpha", ylabel="PCK (%)", xlim=(0, top), ylim=(0, 100), title=f"PCK vs alpha ({p.name})")
    ax1.legend(fontsize=7)
    ax2.set_xticks(np.arange(len(cats) + 1), [ABBREV.get(c, c) for c in cats] + ["all"], rotation=60, fontsize=8)
    ax2.set(ylabel="PCK (%)", ylim=(0, 100),
            title=f"per category\nPCK@{alpha_key(p.alphas[0])} {p.aggregation[0].replace('_', ' ')}")
    if len(reports) > 1:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)


def plot_comparison(comparison: Comparison, out: str | Path) -> None:
    """A - B at the protocol's first alpha and aggregation, overall, per category and per group (AP-10K:
    family, subset): a dot per row with its interval, green where the interval lies above 0, red where
    below, grey where it holds 0; a hollow dot where the group is too small for an interval."""
    c, a = comparison, alpha_key(comparison.protocol.alphas[0])
    agg = c.protocol.aggregation[0]
    rows = [(f"all ({c.pairs:,})", c.cells["overall"]["all"][a][agg])]
    for section in [k for k in c.cells if k == "by_category" or k.startswith("by_group/")]:
        prefix = "" if section == "by_category" else section.split("/", 1)[1] + " "
        rows += [(f"{prefix}{g} ({cells[a][agg]['pairs']:,})", cells[a][agg]) for g, cells in c.cells[section].items()]
    fig = _figure(6.5, 1.2 + 0.24 * len(rows))
    ax = fig.subplots()
    for y, (_, cell) in enumerate(rows):
        if cell["diff"] is None:
            continue
        lo, hi = cell["ci"]
        if lo is None:
            ax.plot(cell["diff"], y, "o", mfc="none", color="grey")
            continue
        color = "tab:green" if lo > 0 else "tab:red" if hi < 0 else "grey"
        ax.errorbar(cell["diff"], y, xerr=[[cell["diff"] - lo], [hi - cell["diff"]]], fmt="o", color=color, capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel(f"PCK@{a} {agg.replace('_', ' ')}: A - B (points)")
    names = [n if len(n) <= 40 else "..." + n[-37:] for n in c.names]
    ax.set_title(f"A = {names[0]}\nB = {names[1]}\n{c.confidence:g} % paired-bootstrap intervals (none under "
                 f"{c.min_pairs} pairs: hollow)", fontsize=8)
    ax.grid(axis="x", lw=0.3)
    fig.tight_layout()
    fig.savefig(out)


def plot_per_keypoint(report: Report, out: str | Path, alpha: float | None = None) -> None:
    """Heat map of :meth:`Report.per_keypoint` at ``alpha`` (default the protocol's first): a row per
    category, a column per keypoint slot (the dataset's numbering), grey where a slot was not evaluated."""
    d = report.per_keypoint()
    a = alpha_key(report.protocol.alphas[0] if alpha is None else alpha)
    agg = report.protocol.aggregation[0]
    cats = list(d["pck"])
    K = int(report.kps_ids.max(initial=-1)) + 1 if report.kps_ids is not None else 0
    grid = np.full((len(cats), max(K, 1)), np.nan)
    for i, c in enumerate(cats):
        for k, cell in d["pck"][c].items():
            grid[i, int(k)] = cell[a][agg]
    fig = _figure(max(6.0, 0.32 * K + 2), max(3.0, 0.32 * len(cats) + 1.2))
    ax = fig.add_subplot()
    ax.set_facecolor("0.85")
    im = ax.imshow(np.ma.masked_invalid(grid), vmin=0, vmax=100, cmap="viridis", aspect="auto")
    ax.set_yticks(np.arange(len(cats)), [ABBREV.get(c, c) for c in cats], fontsize=8)
    ax.set_xticks(np.arange(K), [str(k) for k in range(K)], fontsize=7)
    ax.set(xlabel="keypoint slot", title=f"PCK@{a} {agg.replace('_', ' ')} per keypoint ({report.protocol.name})")
    fig.colorbar(im, ax=ax, label="PCK (%)")
    fig.tight_layout()
    fig.savefig(out)
