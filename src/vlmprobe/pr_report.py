"""`vlmprobe pr-report`: the pull-request report, offline: `dvc metrics diff`, `dvc params diff`
and every declared plot of `dvc plots diff`, rendered to PNG with matplotlib (DVC's own HTML
loads vega from a CDN; these need nothing). CI posts the same markdown as the PR comment.

Writes `<out>/report.md` and `<out>/figures/*.png`: data plots as one figure per plot with a
series per revision, image plots copied once per revision.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from vlmprobe.compare.figures import save  # noqa: E402
from vlmprobe.dvc_run import run_dvc  # noqa: E402
from vlmprobe.io import atomic_dir, write_text  # noqa: E402


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _encodings(spec: Any) -> Iterator[dict[str, Any]]:
    """Every vega-lite `encoding` in a spec, outermost first."""
    if isinstance(spec, dict):
        if isinstance(spec.get("encoding"), dict):
            yield spec["encoding"]
        for value in spec.values():
            yield from _encodings(value)
    elif isinstance(spec, list):
        for value in spec:
            yield from _encodings(value)


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def render_vega(content: dict[str, Any], title: str, path: Path) -> None:
    """A DVC vega-lite plot (data inline, one series per `rev`) as a PNG: grouped horizontal
    bars when one axis is categorical, else one line per revision."""
    enc = next(e for e in _encodings(content) if "field" in e.get("x", {})
               and "field" in e.get("y", {}))
    x, y = enc["x"]["field"], enc["y"]["field"]
    values = content["data"]["values"]
    revs = list(dict.fromkeys(v.get("rev", "") for v in values))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    categorical = [f for f in (x, y) if any(_number(v.get(f)) is None for v in values)]
    if categorical:
        cat = categorical[0]
        num = y if cat == x else x
        cats = list(dict.fromkeys(v[cat] for v in values))
        height = 0.8 / max(1, len(revs))
        for i, rev in enumerate(revs):
            got = {v[cat]: _number(v.get(num)) or 0.0 for v in values if v.get("rev") == rev}
            ax.barh([c + i * height for c in range(len(cats))], [got.get(c, 0.0) for c in cats],
                    height=height, label=rev)
        ax.set_yticks([c + height * (len(revs) - 1) / 2 for c in range(len(cats))], cats,
                      fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(num)
    else:
        for rev in revs:
            pts = sorted((_number(v[x]), _number(v[y])) for v in values if v.get("rev") == rev)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=rev)
        ax.set_xlabel(x)
        ax.set_ylabel(y)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


def render_plots(repo: Path, base: str, figures: Path) -> list[tuple[str, list[tuple[str, str]]]]:
    """Every plot of `dvc plots diff base` into `figures`: (plot path, [(revision, file)])."""
    rendered = []
    with tempfile.TemporaryDirectory() as images:
        data = json.loads(run_dvc(["plots", "diff", base, "--json", "-o", images], repo))["data"]
        for plot, items in data.items():
            files = []
            for item in items:
                if item["type"] == "image":
                    rev = item["revisions"][0]
                    name = f"{slug(rev)}__{slug(plot)}"
                    shutil.copyfile(item["url"], figures / name)
                    files.append((rev, name))
                elif item["type"] == "vega" and item.get("content"):
                    name = f"{slug(plot)}.png"
                    render_vega(item["content"], plot, figures / name)
                    files.append((" vs ".join(item["revisions"]), name))
            rendered.append((plot, files))
    return rendered


def report(repo: Path, base: str, out: Path, figure_url: str | None = None) -> str:
    """Write `out/report.md` and `out/figures/`; return the markdown. `figure_url` prefixes the
    figure links (CI: where the figures are published) instead of the relative `figures/`."""
    metrics = run_dvc(["metrics", "diff", base, "--md"], repo).strip()
    params = run_dvc(["params", "diff", base, "--md"], repo).strip()
    with atomic_dir(out / "figures") as figures:
        plots = render_plots(repo, base, figures)
    prefix = figure_url.rstrip("/") + "/" if figure_url else "figures/"
    lines = [
        f"# vlmprobe report: workspace vs `{base}`",
        "",
        f"## Metrics (`dvc metrics diff {base} --md`)",
        "",
        metrics or "No metric changed.",
        "",
        f"## Params (`dvc params diff {base} --md`)",
        "",
        params or "No param changed.",
        "",
        f"## Plots (`dvc plots diff {base}`, rendered to PNG offline)",
        "",
    ]
    for plot, files in plots:
        lines += [f"### {plot}", ""]
        lines += [f"{rev}: ![{plot} ({rev})]({prefix}{name})" for rev, name in files] or [
            "not produced in either revision"]
        lines.append("")
    text = "\n".join(lines)
    write_text(out / "report.md", text)
    return text
