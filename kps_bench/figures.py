"""Figures for papers: the per-subject contact sheet (``grid``), the identity-preservation plane (``plot``) and the
validity study's scatter grid (``scatter_grid``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .leaderboard import Run, Table
from .rundir import ImageRecord, atomic_path, read_manifest, resolve_image_path

CELL = 96      # pixels per image in the grid
LABEL_W = 150  # width of the row-label column
GAP = 4


def _label_font(size: int = 13):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _open(run: Run, rec: ImageRecord):
    from PIL import Image

    with Image.open(resolve_image_path(run.path, rec)) as im:
        return im.convert("RGB").resize((CELL, CELL), Image.NEAREST if im.width < CELL else Image.BICUBIC)


def grid(runs: list[Run], out: str | Path, prompts: int = 3, seeds: int = 2) -> Path:
    """Contact sheet: per subject, the references, then for ``prompts`` prompts one row per method (base first)
    with the seed-paired trigger-free and trigger images side by side."""
    from PIL import Image, ImageDraw

    if not runs:
        raise UserError("grid needs at least one run directory.")
    manifests = {id(r): read_manifest(r.path / "images.jsonl") for r in runs}
    subjects = sorted({s for r in runs for s in r.results["metrics"]})
    font = _label_font()
    sections = []
    for subject in subjects:
        having = [r for r in runs if subject in r.results["metrics"]]
        recs = {id(r): [x for x in manifests[id(r)] if x.subject == subject and x.valid] for r in having}
        first = having[0]
        prompt_ids = sorted({x.prompt_index for x in recs[id(first)] if x.role != "reference"})[:prompts]
        cols = len(prompt_ids) * seeds * 2
        rows: list[tuple[str, list]] = [("references", [_open(first, x) for x in recs[id(first)]
                                                        if x.role == "reference"][:cols])]
        base = [x for x in recs[id(first)] if x.role == "base"]
        # a run without adapter (method "base") supplies what the base model draws for the trigger prompt
        base_run = next((r for r in having if _is_base(r)), None)
        base_trig = [x for x in recs[id(base_run)] if x.role == "adapter"] if base_run else []
        rows.append(("base", _paired_cells(first, base, prompt_ids, seeds, base_run, base_trig)))
        for r in sorted((r for r in having if not _is_base(r)), key=lambda r: r.method):
            adapt = [x for x in recs[id(r)] if x.role == "adapter"]
            rows.append((r.method, _paired_cells(r, adapt, prompt_ids, seeds, r, adapt)))
        prompt_texts = {x.prompt_index: x.prompt_without_trigger for x in recs[id(first)] if x.role != "reference"}
        header_h = 40
        w = LABEL_W + cols * (CELL + GAP)
        h = 28 + header_h + len(rows) * (CELL + GAP)
        sheet = Image.new("RGB", (w, h), "white")
        d = ImageDraw.Draw(sheet)
        d.text((6, 6), f"subject: {subject}", fill="black", font=_label_font(16))
        for i, p in enumerate(prompt_ids):
            x0 = LABEL_W + i * seeds * 2 * (CELL + GAP)
            d.text((x0, 28), prompt_texts[p][: seeds * 2 * (CELL + GAP) // 7], fill="black", font=font)
            d.text((x0, 28 + 16), "  ".join(["free | trigger"] * seeds), fill="gray", font=font)
        for ri, (label, cells) in enumerate(rows):
            y = 28 + header_h + ri * (CELL + GAP)
            d.text((6, y + CELL // 2 - 8), label, fill="black", font=font)
            for ci, im in enumerate(cells):
                if im is not None:
                    sheet.paste(im, (LABEL_W + ci * (CELL + GAP), y))
        sections.append(sheet)
    width = max(s.width for s in sections)
    full = Image.new("RGB", (width, sum(s.height for s in sections) + GAP * len(sections)), "white")
    y = 0
    for s in sections:
        full.paste(s, (0, y))
        y += s.height + GAP
    return _save(full, out)


def _is_base(run: Run) -> bool:
    return (run.provenance.get("adapter") or {}).get("kind", "none") == "none"


def _paired_cells(run: Run, free_pool, prompt_ids, seeds: int, trig_run: Run | None, trig_pool) -> list:
    """For each prompt and seed: [trigger-free image, trigger image of the same seed] (blank when missing)."""
    cells = []
    for p in prompt_ids:
        free = sorted((x for x in free_pool if x.prompt_index == p and not x.has_trigger), key=lambda x: x.image_index or 0)
        trig = {x.seed: x for x in trig_pool if x.prompt_index == p and x.has_trigger}
        for x in free[:seeds]:
            cells.append(_open(run, x))
            cells.append(_open(trig_run, trig[x.seed]) if x.seed in trig else None)
    return cells


def _save(image, out: str | Path) -> Path:
    out = Path(out)
    with atomic_path(out) as tmp:
        image.save(tmp, format="PNG")
    return out


def plot(table: Table, out: str | Path) -> Path:
    """Identity (x) against preservation (y): one point per row with 95% CI bars, and iso-KPS curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if "identity" not in table.metrics or "preservation" not in table.metrics:
        raise UserError("plot needs runs scored with both identity and preservation.")
    fig, ax = plt.subplots(figsize=(6, 5), dpi=150)
    xs = [r["identity"]["value"] for r in table.rows]
    ys = [r["preservation"]["value"] for r in table.rows]
    lo_x, hi_x = min(r["identity"]["ci_low"] for r in table.rows), max(r["identity"]["ci_high"] for r in table.rows)
    lo_y, hi_y = min(r["preservation"]["ci_low"] for r in table.rows), max(r["preservation"]["ci_high"] for r in table.rows)
    pad_x, pad_y = max(0.02, (hi_x - lo_x) * 0.15), max(0.02, (hi_y - lo_y) * 0.15)
    # a margin beyond 1.0 keeps points at exactly 1 (the base's preservation) inside the frame
    x0, x1 = max(0.0, lo_x - pad_x), min(1.0 + pad_x / 3, hi_x + pad_x)
    y0, y1 = max(0.0, lo_y - pad_y), min(1.0 + pad_y / 3, hi_y + pad_y)
    ii = np.linspace(max(x0, 1e-3), x1, 200)
    for c in np.round(np.linspace(0.05, 0.95, 19), 2):
        with np.errstate(divide="ignore", invalid="ignore"):
            pp = c * ii / (2 * ii - c)  # preservation on the iso-KPS curve kps = c
        ok = (2 * ii > c) & (pp >= y0) & (pp <= y1)
        if ok.sum() > 1:
            ax.plot(ii[ok], pp[ok], color="0.8", lw=0.8, zorder=0)
            ax.annotate(f"KPS {c:.2f}", (ii[ok][-1], pp[ok][-1]), fontsize=6, color="0.5")
    for r, x, y in zip(table.rows, xs, ys):
        xerr = [[x - r["identity"]["ci_low"]], [r["identity"]["ci_high"] - x]]
        yerr = [[y - r["preservation"]["ci_low"]], [r["preservation"]["ci_high"] - y]]
        ax.errorbar([x], [y], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=f"{r['name']} (KPS {r['kps']['value']:.3f})")
    ax.set_xlim(x0, x1)
    ax.set_ylim(y0, y1)
    ax.set_xlabel("identity  (1 + cos CLIP(trigger image, reference)) / 2")
    ax.set_ylabel("preservation  (1 + cos CLIP(base, adapter)) / 2")
    f = table.footer
    ax.set_title(f"{f['protocol']} v{f['protocol_version']} (kps_version {f['kps_version']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save_figure(fig, out)


def _save_figure(fig, out: str | Path) -> Path:
    """Write a matplotlib figure (format from the suffix: png, pdf or svg) to a temporary file, rename it, close it."""
    import matplotlib.pyplot as plt

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower() or "png"
    if fmt not in ("png", "pdf", "svg"):
        raise UserError(f"A figure's file name (plot --out) must end in .png, .pdf or .svg, got '{out.name}'.")
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt)
    plt.close(fig)
    return out


@dataclass(frozen=True)
class Panel:
    """One scatter panel: ``points`` are (label, x, y)."""

    title: str
    xlabel: str
    ylabel: str
    points: list[tuple[str, float, float]]


def scatter_grid(panels: list[Panel], out: str | Path, title: str, columns: int = 4) -> Path:
    """A grid of labelled scatter plots (e.g. each metric against its ground truth, one point per adapter; the point
    labelled ``base`` in red), ``columns`` panels wide, written to ``out`` (.png, .pdf or .svg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise UserError("scatter_grid needs at least one panel.")
    cols = min(columns, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.2 * rows), dpi=150, squeeze=False)
    for ax, p in zip(axes.flat, panels):
        for label, x, y in p.points:
            base = label == "base"
            ax.scatter([x], [y], s=14, color="C3" if base else "C0", zorder=3 if base else 2)
            ax.annotate(label, (x, y), fontsize=4.5, color="0.35", xytext=(2, 2), textcoords="offset points")
        ax.set_title(p.title, fontsize=8)
        ax.set_xlabel(p.xlabel, fontsize=7)
        ax.set_ylabel(p.ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
        ax.grid(color="0.9", lw=0.5, zorder=0)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save_figure(fig, out)
