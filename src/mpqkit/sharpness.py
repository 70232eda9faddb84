"""Sharpness of a trained (possibly quantized) model: surrogate gap and loss landscape.

* Surrogate gap ``h = L(theta + rho g/||g||) - L(theta)`` (SAM's one-step ascent, GSAM's
  sharpness), averaged over a few fixed batches, by :func:`mpqkit.optim.surrogate_gap` over all
  trainable parameters (weights, BatchNorm affine, quantizer steps), the model in eval mode.
* Loss landscape along random directions (Li et al., "Visualizing the Loss Landscape of Neural
  Nets", NeurIPS 2018): ``L(theta + a d1)`` (1-D) or ``L(theta + a d1 + b d2)`` (2-D) on a grid
  of ``a, b`` in ``[-span, span]``. Directions are Gaussian, *filter-normalized* (each output
  filter of a weight scaled to the norm of the same filter of the model), seeded; 1-D
  parameters (BatchNorm, biases, quantizer steps) get a zero direction and stay fixed.

The losses are the mean cross-entropy over the same batches at every point, in eval mode
(BatchNorm running statistics). Quantized models keep their quantizers active, so the landscape
is that of the quantized network.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpqkit.errors import ConfigError

if TYPE_CHECKING:
    from mpqkit.data import DataConfig

LANDSCAPES = ("1d", "2d")


def _xy(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, tuple | list) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ConfigError("sharpness needs labelled batches (inputs, targets)")


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def batches_loss(model: nn.Module, batches: Sequence[Any],
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> float:
    """Mean loss per sample over ``batches``, in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    dev = _device(model)
    total, n = 0.0, 0
    try:
        for b in batches:
            x, y = _xy(b)
            x, y = x.to(dev), y.to(dev)
            total += float(loss_fn(model(x).float(), y)) * y.shape[0]
            n += int(y.shape[0])
    finally:
        model.train(was)
    if n == 0:
        raise ConfigError("no batches to measure the loss on: give at least one batch")
    return total / n


def filter_normalized_direction(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """A random direction per parameter, filter-normalized (Li et al. 2018).

    For every parameter with 2 or more dimensions, a Gaussian tensor whose slice ``[i]`` (one
    output filter) is rescaled to the norm of the parameter's slice ``[i]``; zeros for the
    parameters with fewer dimensions (BatchNorm, biases, quantizer steps).
    """
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, Tensor] = {}
    for name, p in model.named_parameters():
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p)
        pn = p.detach().flatten(1).norm(dim=1)
        dn = d.flatten(1).norm(dim=1).clamp_min(1e-10)
        out[name] = d * (pn / dn).reshape(-1, *([1] * (p.dim() - 1)))
    return out


def loss_landscape(model: nn.Module, batches: Sequence[Any], *, dims: int = 1, points: int = 21,
                   span: float = 1.0, seed: int = 0,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                   ) -> dict[str, Any]:
    """Losses on a 1-D line or 2-D grid of filter-normalized random directions.

    Returns ``{"dims", "points", "span", "seed", "alphas", "betas" (2-D), "loss"}`` where
    ``loss`` is a list (1-D) or a list of rows indexed ``[beta][alpha]`` (2-D), and ``center``
    the loss at the model itself. Parameters are restored exactly afterwards.
    """
    if dims not in (1, 2):
        raise ConfigError(f"landscape dimensions must be 1 or 2, got {dims}: use 1d or 2d")
    if points < 2:
        raise ConfigError(f"landscape points must be >= 2, got {points}: e.g. 21")
    if not span > 0:
        raise ConfigError(f"landscape span must be positive, got {span}: e.g. 1.0")
    batches = list(batches)
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    d1 = filter_normalized_direction(model, seed)
    d2 = filter_normalized_direction(model, seed + 1) if dims == 2 else None
    alphas = [-span + 2 * span * i / (points - 1) for i in range(points)]
    betas = alphas if dims == 2 else [0.0]

    def at(a: float, b: float) -> float:
        with torch.no_grad():
            for n, p in params.items():
                v = saved[n] + a * d1[n]
                if d2 is not None:
                    v = v + b * d2[n]
                p.copy_(v)
        return batches_loss(model, batches, loss_fn)

    try:
        grid = [[at(a, b) for a in alphas] for b in betas]
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    center = batches_loss(model, batches, loss_fn)
    res: dict[str, Any] = {"dims": dims, "points": points, "span": span, "seed": seed,
                           "alphas": alphas, "center": center}
    if dims == 1:
        res["loss"] = grid[0]
    else:
        res["betas"] = betas
        res["loss"] = grid
    return res


def surrogate_gaps(model: nn.Module, batches: Sequence[Any], rho: float) -> list[float]:
    """The surrogate gap of each batch at radius ``rho`` (eval mode, parameters restored)."""
    from mpqkit.optim import surrogate_gap

    was = model.training
    model.eval()
    dev = _device(model)
    try:
        return [surrogate_gap(model, nn.CrossEntropyLoss(),
                              [tuple(t.to(dev) for t in _xy(b))], rho) for b in batches]
    finally:
        model.train(was)


def plot_landscape(land: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A PNG of a 1-D curve or 2-D contour map from :func:`loss_landscape` (matplotlib Agg)."""
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(5.5, 4.2), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    if land["dims"] == 1:
        ax.plot(land["alphas"], land["loss"], marker=".", color="tab:blue")
        ax.axvline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("step along filter-normalized direction")
        ax.set_ylabel("loss")
    else:
        z = land["loss"]
        finite = [v for row in z for v in row if math.isfinite(v)]
        levels = 20 if finite and max(finite) > min(finite) else None
        cs = ax.contourf(land["alphas"], land["betas"], z, levels=levels, cmap="viridis")
        ax.contour(land["alphas"], land["betas"], z, levels=levels, colors="k",
                   linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="loss")
        ax.plot([0], [0], marker="+", color="white", ms=10)
        ax.set_xlabel("direction 1")
        ax.set_ylabel("direction 2")
        ax.set_aspect("equal")
    ax.set_title(title or f"loss landscape ({land['dims']}-D, seed {land['seed']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return path


def measure_sharpness(model: nn.Module, batches: Iterable[Any], *, rho: float = 0.05,
                      landscape: str | None = None, points: int = 21, span: float = 1.0,
                      seed: int = 0, out: str | Path | None = None,
                      info: dict[str, Any] | None = None) -> dict[str, Any]:
    """Loss, surrogate gap at ``rho`` and (optionally) the landscape of ``model`` on ``batches``.

    With ``out``, writes ``sharpness.json`` and, with a landscape, ``landscape_1d.png`` or
    ``landscape_2d.png`` there. ``info`` is copied into the result (e.g. checkpoint, data).
    """
    if landscape is not None and landscape not in LANDSCAPES:
        raise ConfigError(f"landscape {landscape!r} is unknown: use 1d or 2d")
    batches = list(batches)
    t0 = time.time()
    loss = batches_loss(model, batches)
    gaps = surrogate_gaps(model, batches, rho)
    res: dict[str, Any] = dict(info or {})
    res.update({"rho": rho, "batches": len(batches),
                "images": sum(int(_xy(b)[1].shape[0]) for b in batches), "loss": loss,
                "surrogate_gap": sum(gaps) / len(gaps), "surrogate_gap_per_batch": gaps})
    if landscape is not None:
        res["landscape"] = loss_landscape(model, batches, dims=int(landscape[0]), points=points,
                                          span=span, seed=seed)
    res["seconds"] = round(time.time() - t0, 3)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if landscape is not None:
            png = plot_landscape(res["landscape"], out / f"landscape_{landscape}.png",
                                 title=f"{res.get('checkpoint', 'model')}: gap "
                                       f"{res['surrogate_gap']:.4f} at rho {rho}")
            res["plot"] = str(png)
        (out / "sharpness.json").write_text(json.dumps(res, indent=2) + "\n")
    return res


def sharpness_from_checkpoint(checkpoint: str | Path,
                              data: DataConfig | Mapping[str, Any] | None = None, *,
                              rho: float = 0.05, batches: int = 8, batch_size: int = 128,
                              split: str = "train", landscape: str | None = None,
                              points: int = 21, span: float = 1.0, seed: int = 0,
                              out: str | Path | None = None,
                              device: str = "auto") -> dict[str, Any]:
    """:func:`measure_sharpness` of a checkpoint (quantizers active) on ``batches`` batches.

    ``data``: a :class:`mpqkit.data.DataConfig`, or a dict of its fields (the dataset name
    defaults to the checkpoint's). The images are normalized as in training and not augmented;
    ``split`` is ``train`` (shuffled with ``seed``) or ``test``.
    """
    from dataclasses import replace

    from mpqkit.data import DataConfig, build_data, make_loader
    from mpqkit.engine import check_classes, from_dict, load_checkpoint_model
    from mpqkit.engine.distributed import resolve_device

    if split not in ("train", "test"):
        raise ConfigError(f"split {split!r} is unknown: use train or test")
    if batches < 1 or batch_size < 1:
        raise ConfigError("--batches and --batch-size must be >= 1")
    model, meta = load_checkpoint_model(checkpoint)
    if data is None or isinstance(data, Mapping):
        d = {"name": meta.get("dataset", "cifar10"), **(data or {})}
        cfg = from_dict(DataConfig, d, "data")
    else:
        cfg = data
    over: dict[str, Any] = {"augment": False}
    if cfg.mean is None and meta.get("mean"):
        over["mean"] = tuple(meta["mean"])
        over["std"] = tuple(meta["std"])
    size = meta.get("input_size")
    if cfg.input_size is None and size:  # an int, or [h, w] (a search's supernet)
        over["input_size"] = int(size[0] if isinstance(size, list | tuple) else size)
    cfg = replace(cfg, **over)
    bundle = build_data(cfg)
    check_classes(meta, bundle.num_classes, bundle.name, str(checkpoint),
                  "measure it on the dataset it was trained on")
    ds = bundle.train if split == "train" else bundle.test
    loader = make_loader(ds, batch_size, train=split == "train", seed=seed, workers=cfg.workers)
    picked = []
    for i, b in enumerate(loader):
        if i >= batches:
            break
        picked.append((b[0], b[1]))
    dev = resolve_device(device)
    model.to(dev)
    picked = [(x.to(dev), y.to(dev)) for x, y in picked]
    info = {"checkpoint": str(checkpoint), "model": meta.get("model"),
            "quantized": bool(meta.get("policy")), "data": bundle.description, "split": split,
            "batch_size": batch_size, "seed": seed}
    return measure_sharpness(model, picked, rho=rho, landscape=landscape, points=points,
                             span=span, seed=seed, out=out, info=info)
