"""report.html: what curation did, in numbers and pictures (drawn with Pillow; no plotting library needed).

- the nearest-neighbour similarity histogram with the dedup threshold (to calibrate it),
- per level: cluster sizes ranked, before (points) and after (selected images), log scale, with the normalised
  entropy of the size distribution (1 = perfectly balanced),
- thumbnails of the largest, median and smallest level-1 clusters, selected images framed in green.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinokit import atomic
from dinokit.curate.hierarchy import flat_sizes

WIDTH, HEIGHT, MARGIN = 640, 280, 40


def normalised_entropy(counts) -> float:
    p = np.asarray(counts, dtype=np.float64)
    if len(p) < 2 or p.sum() == 0:
        return 1.0
    q = p[p > 0] / p.sum()
    return float(-(q * np.log(q)).sum() / math.log(len(p)))


def _save_png(image: Image.Image, path: Path) -> None:
    atomic.atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def _canvas(title: str) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    draw.text((MARGIN, 8), title, fill="black")
    draw.line([(MARGIN, HEIGHT - MARGIN), (WIDTH - 10, HEIGHT - MARGIN)], fill="black")
    draw.line([(MARGIN, 24), (MARGIN, HEIGHT - MARGIN)], fill="black")
    return image, draw


def histogram_png(path: Path, counts, edges, threshold: float) -> None:
    """Bars of log(1 + count) over [lowest non-empty bin, 1]; the threshold as a red line."""
    counts, edges = np.asarray(counts), np.asarray(edges)
    first = int(np.flatnonzero(counts)[0]) if counts.any() else 0
    counts, edges = counts[first:], edges[first:]
    image, draw = _canvas(f"nearest-neighbour cosine similarity (log count); threshold {threshold}")
    plot_w, plot_h = WIDTH - MARGIN - 10, HEIGHT - MARGIN - 30
    top = math.log1p(counts.max()) if counts.any() else 1
    lo, hi = float(edges[0]), float(edges[-1])

    def x_of(v):
        return MARGIN + (v - lo) / max(hi - lo, 1e-9) * plot_w

    for c, a, b in zip(counts, edges[:-1], edges[1:]):
        if c:
            h = math.log1p(c) / top * plot_h
            draw.rectangle([x_of(a), HEIGHT - MARGIN - h, max(x_of(b) - 1, x_of(a)), HEIGHT - MARGIN], fill="#4477aa")
    draw.line([(x_of(threshold), 24), (x_of(threshold), HEIGHT - MARGIN)], fill="red", width=2)
    for v in np.linspace(lo, hi, 6):
        draw.text((x_of(v) - 12, HEIGHT - MARGIN + 6), f"{v:.2f}", fill="black")
    _save_png(image, path)


def sizes_png(path: Path, before, after, level: int) -> None:
    """Cluster sizes ranked largest first, log scale: before (grey) and after sampling (blue)."""
    image, draw = _canvas(f"level {level}: cluster sizes ranked (log), grey = pool, blue = selected")
    plot_w, plot_h = WIDTH - MARGIN - 10, HEIGHT - MARGIN - 30
    top = math.log10(max(before.max(), 1)) + 0.1
    for values, colour in ((np.sort(before)[::-1], "#999999"), (np.sort(after)[::-1], "#4477aa")):
        points = [(MARGIN + i / max(len(values) - 1, 1) * plot_w,
                   HEIGHT - MARGIN - math.log10(max(v, 1)) / top * plot_h) for i, v in enumerate(values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
    for e in range(int(top) + 1):
        y = HEIGHT - MARGIN - e / top * plot_h
        draw.text((4, y - 6), f"1e{e}", fill="black")
    _save_png(image, path)


def fit_cell(picture: Image.Image, size: int) -> Image.Image:
    """`picture` scaled, up or down, so that its longer side is `size` (a 32-px CIFAR image fills its cell and
    its frame as a photograph does; PIL's `thumbnail` only shrinks)."""
    scale = size / max(picture.size)
    return picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                          Image.BICUBIC)


def thumbnails_png(path: Path, paths: list[str], groups: list[tuple[str, list[int], set[int]]], size: int = 64):
    """One row per (label, member rows, selected rows); returns False when no image could be read."""
    per_row = 10
    image = Image.new("RGB", (per_row * (size + 6) + 150, len(groups) * (size + 10) + 6), "white")
    draw = ImageDraw.Draw(image)
    drawn = 0
    for g, (label, members, selected) in enumerate(groups):
        y = 6 + g * (size + 10)
        draw.text((4, y + size // 2 - 6), label, fill="black")
        for j, row in enumerate(members[:per_row]):
            x = 150 + j * (size + 6)
            try:
                with Image.open(paths[row]) as picture:
                    thumb = fit_cell(picture.convert("RGB"), size)
            except (OSError, ValueError):
                continue
            image.paste(thumb, (x + (size - thumb.width) // 2, y + (size - thumb.height) // 2))
            drawn += 1
            if row in selected:
                draw.rectangle([x - 2, y - 2, x + size + 1, y + size + 1], outline="#22aa22", width=3)
    if drawn:
        _save_png(image, path)
    return bool(drawn)


def write_report(out: Path, pool, counts: dict, levels, survivors: np.ndarray, selection: dict, options) -> None:
    sections = [f"<h1>dinokit curate</h1><p>pool <code>{html.escape(pool.source)}</code>: {len(pool):,} images, "
                f"{pool.dim}-d</p>", "<h2>Counts</h2><table border=1 cellpadding=4>"]
    for key, value in counts.items():
        sections.append(f"<tr><td>{html.escape(str(key))}</td><td>{html.escape(json.dumps(value))}</td></tr>")
    sections.append("</table>")

    histogram = out / "dedup" / "nn_similarity.json"
    if histogram.is_file():
        h = json.loads(histogram.read_text())
        histogram_png(out / "nn_similarity.png", h["counts"], h["bin_edges"], h["threshold"])
        quantiles = ", ".join(f"{float(q):.1%}: {v:.3f}" for q, v in h["quantiles"].items())
        sections.append(f"<h2>Nearest-neighbour similarity</h2><p>Images whose nearest neighbour is at or above "
                        f"the threshold ({h['threshold']}) are linked; one image per linked component is kept. "
                        f"Quantiles: {quantiles}.</p><img src='nn_similarity.png'>")

    if levels:
        times = np.zeros(len(pool), dtype=np.int64)
        times[selection["rows"]] = selection["times"]
        picked = times[survivors]  # per clustered point
        sizes = flat_sizes(levels)
        sections.append("<h2>Clusters</h2><table border=1 cellpadding=4><tr><th>level</th><th>clusters</th>"
                        "<th>size min / median / max</th><th>entropy before</th><th>entropy after</th></tr>")
        paths = [levels[0].labels]
        for lv in levels[1:]:
            paths.append(lv.labels[paths[-1]])
        for number, (before, labels) in enumerate(zip(sizes, paths), start=1):
            after = np.bincount(labels, weights=picked, minlength=len(before))
            sizes_png(out / f"cluster_sizes_level{number}.png", before, after, number)
            sections.append(f"<tr><td>{number}</td><td>{len(before):,}</td><td>{before.min()} / "
                            f"{int(np.median(before))} / {before.max()}</td><td>{normalised_entropy(before):.3f}</td>"
                            f"<td>{normalised_entropy(after):.3f}</td></tr>")
        sections.append("</table>")
        sections += [f"<img src='cluster_sizes_level{i}.png'>" for i in range(1, len(levels) + 1)]
        if pool.paths is not None:
            leaf = levels[0]
            order = np.argsort(sizes[0])[::-1]
            chosen = [("largest", order[0]), ("median", order[len(order) // 2]), ("smallest", order[-1])]
            groups = []
            for label, c in chosen:
                members = np.flatnonzero(leaf.labels == c)
                members = members[np.argsort(leaf.sqdist[members])]
                rows = survivors[members].tolist()
                groups.append((f"{label} ({sizes[0][c]})", rows, {r for r in rows if times[r]}))
            if thumbnails_png(out / "cluster_thumbnails.png", pool.paths, groups):
                sections.append("<h2>Level-1 clusters</h2><p>Closest to the centroid first; selected images "
                                "framed in green.</p><img src='cluster_thumbnails.png'>")
    page = "<!doctype html><meta charset=utf-8><title>dinokit curate</title>" + "\n".join(sections) + "\n"
    atomic.write_text(out / "report.html", page)
