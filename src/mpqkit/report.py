"""Plots and tables of run folders (``mpqkit report RUN_DIR [RUN_DIR ...]``).

Per run folder, whatever it holds:

* ``policy.json``: the per-layer bit allocation, a bar chart of weight and activation bits by
  layer name (fixed layers hatched) -> ``bits.png``;
* ``search.csv`` (a search run): the search curves, one panel per quantity found among loss,
  accuracy, expected BitOps against the budget, lambda, rho and the surrogate gap h ->
  ``search_curves.png``;
* ``alpha.json`` / ``alpha.csv`` (a search run): the final bit probabilities per layer ->
  ``alpha.png``;
* ``metrics.csv`` (a train/fine-tune run): loss and accuracy per epoch -> ``accuracy.png``.

Over all run folders, a comparison table (``comparison.md`` and ``comparison.csv``): method,
model, budget, BitOps, size, average bits, search wall time and accuracy where present.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpqkit.errors import ConfigError, PolicyError
from mpqkit.policy import Policy
from mpqkit.search.context import Provenance

# panels of the search curves: title -> regular expression over the CSV column names
# (``mpqkit search`` writes epoch, loss, acc, task_loss, extra_loss, expected_bitops,
# expected_size_mb, expected_ratio, argmax_bitops, argmax_size_mb, lambda, rho, h, cos,
# decidedness, ...)
CURVE_PANELS: dict[str, str] = {
    "loss": r"(^|_)(loss|ce)($|_)",
    "accuracy (%)": r"(^|_)(acc|top1)($|_)",
    "BitOps": r"bitops",
    "size (MB)": r"size_mb",
    "cost / budget": r"ratio",
    "lambda": r"^(lambda|lam)$",
    "rho": r"^rho$",
    "surrogate gap h": r"^(h|gap|h_ema|surrogate_gap)$",
    "cos(g, g_adv)": r"^cos$",
    "decidedness": r"decided",
}
X_COLUMNS = ("step", "global_step", "iteration", "epoch")


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a CSV file (empty list if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _num(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _numeric_columns(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    cols = []
    for c in rows[0]:
        if c is None:
            continue
        if any(_num(r.get(c)) is not None for r in rows):
            cols.append(c)
    return cols


def _x_axis(rows: list[dict[str, str]], cols: list[str]) -> tuple[str, list[float]]:
    for c in X_COLUMNS:
        if c in cols:
            xs = [_num(r.get(c)) for r in rows]
            if all(x is not None for x in xs):
                return c, xs  # type: ignore[return-value]
    return "row", [float(i) for i in range(len(rows))]


def _figure(rows: int, cols: int, w: float, h: float, *, left: float = 0.7,
            right: float = 0.3, top: float = 0.5, bottom: float = 0.6, hspace: float = 0.9,
            wspace: float = 0.8):  # type: ignore[no-untyped-def]
    """A figure of ``rows x cols`` axes with fixed margins and gaps in inches.

    Fixed margins instead of a layout engine: ``tight_layout`` costs seconds on many panels.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    fig.subplots_adjust(left=left / w, right=1 - right / w, top=1 - top / h, bottom=bottom / h,
                        hspace=hspace / ((h - top - bottom) / rows),
                        wspace=wspace / ((w - left - right) / cols))
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(rows * cols)]
    return fig, axes


# ----------------------------------------------------------------------------------------------
# plots
# ----------------------------------------------------------------------------------------------
def plot_bits(policy: Policy, path: str | Path, title: str = "") -> Path:
    """Bar chart of the weight and activation bits of every layer, by layer name."""
    path = Path(path)
    names = list(policy.layers)
    n = len(names)
    fig, (ax,) = _figure(1, 1, max(6.0, 0.32 * n + 2), 4.6, bottom=1.2)
    xs = list(range(n))
    width = 0.4
    w = [min(policy.layers[k].w_bits, 9) for k in names]
    a = [min(policy.layers[k].a_bits, 9) for k in names]
    hatch = ["//" if policy.layers[k].fixed else "" for k in names]
    bw = ax.bar([x - width / 2 for x in xs], w, width, label="weight bits", color="tab:blue")
    ba = ax.bar([x + width / 2 for x in xs], a, width, label="activation bits",
                color="tab:orange")
    for bars in (bw, ba):
        for bar, hh in zip(bars, hatch, strict=True):
            bar.set_hatch(hh)
    ax.set_xticks(xs)
    ax.set_xticklabels(names, rotation=90, fontsize=7)
    ax.set_ylabel("bits (32 = full precision, drawn at 9)")
    ax.set_ylim(0, 9.5)
    ax.legend(fontsize=8, loc="upper right")
    c = policy.complexity()
    method = Provenance.from_dict(policy.provenance).method
    ax.set_title(title or (f"{policy.model or 'policy'} ({method})"
                           f": {c.bitops / 1e9:.3f}G BitOps, {c.size_mb:.3f} MB, avg w"
                           f"{c.avg_w_bits:.2f}/a{c.avg_a_bits:.2f}; hatched = fixed"),
                 fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


_BUDGET_PANEL = {"bitops": "BitOps", "size_mb": "size (MB)"}


def plot_search_curves(rows: list[dict[str, str]], path: str | Path,
                       budget: tuple[str, float, str] | None = None,
                       title: str = "") -> Path | None:
    """One panel per quantity of ``search.csv`` found (see ``CURVE_PANELS``); None if none.

    ``budget``: ``(kind, value, spec)``, drawn as a line in the BitOps or size panel.
    """
    cols = _numeric_columns(rows)
    xname, xs = _x_axis(rows, cols)
    panels: list[tuple[str, list[str]]] = []
    used: set[str] = {xname}
    for title_p, pat in CURVE_PANELS.items():
        found = [c for c in cols if c not in used and re.search(pat, c.lower())]
        if found:
            used.update(found)
            panels.append((title_p, found))
    if not panels:
        return None
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = _figure(nrows, ncols, 5.2 * ncols, 3.2 * nrows + 0.4, top=0.7)
    for ax, (name, columns) in zip(axes, panels):
        for c in columns:
            pts = [(x, _num(r.get(c))) for x, r in zip(xs, rows, strict=True)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=c, lw=1.2)
        if budget is not None and name == _BUDGET_PANEL[budget[0]]:
            ax.axhline(budget[1], color="red", ls="--", lw=1, label=f"budget {budget[2]}")
            ax.axhline(0.98 * budget[1], color="red", ls=":", lw=0.8, label="98% of budget")
        if name == "cost / budget":
            ax.axhline(1.0, color="red", ls="--", lw=1, label="budget")
            ax.axhline(0.98, color="red", ls=":", lw=0.8, label="98%")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xname, fontsize=8)
        ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_metrics(rows: list[dict[str, str]], path: str | Path, title: str = "") -> Path | None:
    """Accuracy (and loss) per epoch of a train/fine-tune ``metrics.csv``; None if no column."""
    cols = _numeric_columns(rows)
    xname, xs = _x_axis(rows, cols)
    accs = [c for c in cols if re.search(r"acc|top1|top5", c.lower())]
    losses = [c for c in cols if "loss" in c.lower()]
    if not accs and not losses:
        return None
    panels = [("accuracy (%)", accs), ("loss", losses)]
    panels = [p for p in panels if p[1]]
    fig, axes = _figure(1, len(panels), 5.2 * len(panels), 4.0, top=0.7)
    for ax, (name, columns) in zip(axes, panels):
        for c in columns:
            pts = [(x, _num(r.get(c))) for x, r in zip(xs, rows, strict=True)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=c)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xname, fontsize=8)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def read_alpha(run_dir: str | Path) -> dict[str, dict[str, list[float]]] | None:
    """Final bit probabilities per layer from ``alpha.json`` or ``alpha.csv``, if present.

    Returns ``{layer: {"w_bits": [...], "w_prob": [...], "a_bits": [...], "a_prob": [...]}}``.
    ``alpha.json`` as ``mpqkit search`` writes it: ``{"w_candidates": [...], "a_candidates":
    [...], "epochs": [{"epoch": 1, "layers": {layer: {"w": [p, ...], "a": [p, ...]}}}, ...]}``
    (the last epoch is read); a single ``{"layers": {...}}`` or ``{layer: {"w": {bits: p}}}`` is
    accepted too. ``alpha.csv``: the last row per layer of columns ``layer``, ``kind``
    (``w``/``a``) and one column per bit-width (``2``, ``3``, ... or ``p2``, ``b2``, ...).
    """
    run_dir = Path(run_dir)
    js = run_dir / "alpha.json"
    if js.is_file():
        try:
            d = json.loads(js.read_text())
        except ValueError:
            return None
        return _alpha_from_json(d) if isinstance(d, dict) else None
    rows = read_csv(run_dir / "alpha.csv")
    if not rows or "layer" not in rows[0]:
        return None
    out: dict[str, dict[str, list[float]]] = {}
    bit_cols = {}
    for c in rows[0]:
        m = re.fullmatch(r"[a-z_]*?(\d+)", str(c))
        if m and c not in ("layer", "kind", "step", "epoch"):
            bit_cols[c] = int(m.group(1))
    for r in rows:  # later rows overwrite earlier ones: the last state wins
        side = (r.get("kind") or r.get("side") or "w").strip().lower()[:1]
        items = sorted((b, _num(r.get(c)) or 0.0) for c, b in bit_cols.items())
        out.setdefault(r["layer"], {})[f"{side}_bits"] = [float(b) for b, _ in items]
        out[r["layer"]][f"{side}_prob"] = [p for _, p in items]
    return out or None


def _alpha_from_json(d: dict[str, Any]) -> dict[str, dict[str, list[float]]] | None:
    cands = {"w": d.get("w_candidates"), "a": d.get("a_candidates")}
    layers = d.get("layers", d)
    if isinstance(d.get("epochs"), list) and d["epochs"]:
        layers = d["epochs"][-1].get("layers", {})
    out: dict[str, dict[str, list[float]]] = {}
    for layer, v in layers.items():
        if not isinstance(v, dict):
            continue
        entry: dict[str, list[float]] = {}
        for side in ("w", "a"):
            val = v.get(side)
            if isinstance(val, dict):
                items = sorted((int(k), float(p)) for k, p in val.items())
                entry[f"{side}_bits"] = [float(k) for k, _ in items]
                entry[f"{side}_prob"] = [p for _, p in items]
            elif isinstance(val, list):
                bits = cands[side] if isinstance(cands[side], list) and len(cands[side]) == len(
                    val) else list(range(len(val)))
                entry[f"{side}_bits"] = [float(b) for b in bits]
                entry[f"{side}_prob"] = [float(p) for p in val]
        if entry:
            out[layer] = entry
    return out or None


def plot_alpha(alpha: dict[str, dict[str, list[float]]], path: str | Path) -> Path:
    """Heat maps of the bit probabilities per layer (weights left, activations right)."""
    layers = list(alpha)
    fig, axes = _figure(1, 2, 11.0, max(3.0, 0.2 * len(layers) + 1.2), left=1.4,
                        wspace=1.9)
    for ax, side in zip(axes, ("w", "a")):
        bits = next((alpha[n][f"{side}_bits"] for n in layers if f"{side}_bits" in alpha[n]), [])
        z = [alpha[n].get(f"{side}_prob", [float("nan")] * len(bits)) for n in layers]
        if bits:
            im = ax.imshow(z, aspect="auto", cmap="Blues", vmin=0, vmax=1)
            ax.set_xticks(range(len(bits)))
            ax.set_xticklabels([str(int(b)) for b in bits])
            fig.colorbar(im, ax=ax)
        ax.set_yticks(range(len(layers)))
        ax.set_yticklabels(layers, fontsize=6)
        ax.set_title(f"{'weight' if side == 'w' else 'activation'} bit probabilities",
                     fontsize=9)
        ax.set_xlabel("bits", fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# ----------------------------------------------------------------------------------------------
# summaries and the comparison table
# ----------------------------------------------------------------------------------------------
def summarize_run(run_dir: str | Path) -> dict[str, Any]:
    """One row of the comparison table for a run folder."""
    run_dir = Path(run_dir)
    row: dict[str, Any] = {"run": run_dir.name or str(run_dir), "path": str(run_dir)}
    pol_path = run_dir / "policy.json"
    if pol_path.is_file():
        pol = Policy.load(pol_path)
        c = pol.complexity()
        prov = Provenance.from_dict(pol.provenance)
        row.update(method=prov.method, model=pol.model,
                   budget=(pol.budget or {}).get("spec", ""), bitops_g=c.bitops / 1e9,
                   size_mb=c.size_mb, avg_w_bits=c.avg_w_bits, avg_a_bits=c.avg_a_bits,
                   search_data=prov.dataset, search_seconds=prov.wall_time_s,
                   search_images=prov.images_processed,
                   layers_repaired=len(prov.repaired_layers) if prov.repair else None)
    metrics = read_csv(run_dir / "metrics.csv")
    accs = [_num(r.get("eval_acc")) for r in metrics]
    accs = [a for a in accs if a is not None]
    if accs:
        row.update(final_acc=accs[-1], best_acc=max(accs))
    search = read_csv(run_dir / "search.csv")
    if search:
        row["search_steps"] = len(search)
        cols = _numeric_columns(search)
        acc_cols = [c for c in cols if re.search(CURVE_PANELS["accuracy (%)"], c.lower())]
        if acc_cols:
            last = _num(search[-1].get(acc_cols[0]))
            if last is not None:
                row["search_acc"] = last
    return row


TABLE_COLUMNS = [("run", "run"), ("method", "method"), ("model", "model"), ("budget", "budget"),
                 ("bitops_g", "BitOps (G)"), ("size_mb", "size (MB)"),
                 ("avg_w_bits", "avg w bits"), ("avg_a_bits", "avg a bits"),
                 ("search_seconds", "search time (s)"), ("search_images", "search images"),
                 ("layers_repaired", "layers repaired"),
                 ("search_acc", "search acc (%)"),
                 ("final_acc", "final acc (%)"), ("best_acc", "best acc (%)")]


def _fmt(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        if v.is_integer() and abs(v) >= 100:
            return f"{int(v)}"
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of run summaries (columns without any value are left out)."""
    cols = [(k, t) for k, t in TABLE_COLUMNS if any(r.get(k) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(t for _, t in cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in cols) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(rows: Sequence[dict[str, Any]], out: str | Path) -> tuple[Path, Path]:
    """``comparison.md`` and ``comparison.csv`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "comparison.md"
    md.write_text(comparison_table(rows))
    keys = [k for k, _ in TABLE_COLUMNS] + ["path"]
    cs = out / "comparison.csv"
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    return md, cs


def report_run(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """The plots of one run folder into ``out``; returns its summary row and the files."""
    run_dir, out = Path(run_dir), Path(out)
    files: list[str] = []
    budget = None
    if (run_dir / "policy.json").is_file():
        pol = Policy.load(run_dir / "policy.json")
        files.append(str(plot_bits(pol, out / "bits.png")))
        b = pol.budget or {}
        if b.get("kind") in _BUDGET_PANEL and _num(b.get("value")) is not None:
            budget = (str(b["kind"]), float(b["value"]), str(b.get("spec", "")))
    search = read_csv(run_dir / "search.csv")
    if search:
        p = plot_search_curves(search, out / "search_curves.png", budget=budget,
                               title=run_dir.name)
        if p:
            files.append(str(p))
    alpha = read_alpha(run_dir)
    if alpha:
        files.append(str(plot_alpha(alpha, out / "alpha.png")))
    metrics = read_csv(run_dir / "metrics.csv")
    if metrics:
        p = plot_metrics(metrics, out / "accuracy.png", title=run_dir.name)
        if p:
            files.append(str(p))
    return {"summary": summarize_run(run_dir), "files": files}


def default_report_dir(run_dirs: Sequence[Path]) -> Path:
    """Where a report goes without ``--out``: the run folder, or ``report/`` beside several."""
    if len(run_dirs) == 1:
        return run_dirs[0]
    parents = [str(d.absolute().parent) for d in run_dirs]
    common = Path(os.path.commonpath(parents))
    try:  # keep it relative when the run folders were given relative to the working folder
        common = common.relative_to(Path.cwd())
    except ValueError:
        pass
    return common / "report"


def make_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Plots of every run folder and the comparison table.

    ``out`` defaults to the run folder itself for one run, else ``report/`` in the folder that
    holds the run folders (``runs/report`` for ``runs/search runs/qat``: the working folder only
    when the run folders are in it); with several runs each run's plots go to
    ``out/<run name>/``.
    """
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ConfigError("give at least one run folder: mpqkit report RUN_DIR [RUN_DIR ...]")
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"run folder {d} does not exist: pass folders written by "
                              "mpqkit search / finetune / train")
        if not any((d / f).is_file() for f in ("policy.json", "search.csv", "metrics.csv")):
            raise ConfigError(f"{d} holds no policy.json, search.csv or metrics.csv: pass a run "
                              "folder written by mpqkit search / finetune / train")
    base = Path(out) if out is not None else default_report_dir(dirs)
    runs, seen = [], set()
    for d in dirs:
        name = d.resolve().name or "run"
        k, sub = 1, name
        while sub in seen:
            k += 1
            sub = f"{name}-{k}"
        seen.add(sub)
        try:
            runs.append(report_run(d, base if len(dirs) == 1 else base / sub))
        except PolicyError as exc:
            raise PolicyError(f"{d}: {exc}") from None
    rows = [r["summary"] for r in runs]
    md, cs = write_comparison(rows, base)
    return {"out": str(base), "runs": runs, "table": str(md), "csv": str(cs),
            "markdown": comparison_table(rows)}
