"""Run an exported model next to the PyTorch model and compare what they predict.

:func:`verify_onnx` runs the ONNX file in onnxruntime (CPU) and the PyTorch model on the same
batches and reports top-1 of both, the agreement of the predicted classes and the largest logit
difference. :func:`verify_packed` does the same for a packed file reloaded with
:func:`~mpqkit.export.packed.load_packed` (expected: identical logits).
:func:`verify_export` does either for an export of a checkpoint, on the test split of the
dataset it was trained on. :func:`check_verification` turns a result into a pass or a one-line
:class:`~mpqkit.export.VerificationError`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from mpqkit.export import ExportError, VerificationError

if TYPE_CHECKING:
    from mpqkit.data import DataConfig


def make_session(onnx_path: str | Path, threads: int | None = None,
                 config: Mapping[str, str] | None = None,
                 optimized_path: str | Path | None = None) -> Any:
    """An onnxruntime CPU session (all graph optimisations; ``threads`` intra-op threads;
    ``config``: session config entries, e.g. ``{"session.disable_quant_qdq": "1"}``;
    ``optimized_path``: where onnxruntime writes the optimized graph, whose node types are the
    kernels that run)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"onnxruntime {ort.__version__} cannot load {onnx_path} "
                          f"({msg[-160:]}): export with an older --opset") from None


def _batches(loader: Iterable[Any]) -> Iterable[tuple[Tensor, Tensor | None]]:
    for b in loader:
        if isinstance(b, Tensor):
            yield b, None
        else:
            yield b[0], (b[1] if len(b) > 1 else None)


@torch.no_grad()
def _compare(model: nn.Module, other: Callable[[Tensor], np.ndarray], loader: Iterable[Any],
             max_batches: int | None, name: str) -> dict[str, Any]:
    was = model.training
    model.eval()
    device = next(iter(model.parameters()), torch.zeros(())).device
    n = labelled = ref_correct = oth_correct = agree = identical = 0
    max_diff = 0.0
    diff_sum = 0.0
    try:
        for i, (x, y) in enumerate(_batches(loader)):
            if max_batches is not None and i >= max_batches:
                break
            x = x.float().contiguous()
            ref = model(x.to(device)).float().cpu().numpy()
            out = np.asarray(other(x))
            if out.shape != ref.shape:
                raise ExportError(f"the {name} model returns shape {out.shape}, the PyTorch "
                                  f"model {ref.shape}: the export is broken")
            d = np.abs(out.astype(np.float64) - ref)
            max_diff = max(max_diff, float(d.max()) if d.size else 0.0)
            diff_sum += float(d.sum())
            pr, po = ref.argmax(1), out.argmax(1)
            agree += int((pr == po).sum())
            identical += int(np.all(out == ref, axis=1).sum())
            n += len(x)
            if y is not None:
                yy = y.cpu().numpy()
                labelled += len(yy)
                ref_correct += int((pr == yy).sum())
                oth_correct += int((po == yy).sum())
    finally:
        model.train(was)
    if n == 0:
        raise ExportError("the verification loader gave no images: pass a non-empty test set")
    ref_top1 = 100.0 * ref_correct / labelled if labelled else None
    oth_top1 = 100.0 * oth_correct / labelled if labelled else None
    ncls = ref.shape[1] if ref.ndim == 2 else 1
    return {
        "images": n, "torch_top1": ref_top1, f"{name}_top1": oth_top1,
        "top1_diff": abs(ref_top1 - oth_top1) if labelled else None,
        "agreement": 100.0 * agree / n, "disagreements": n - agree,
        "identical_logits": 100.0 * identical / n,
        "max_logit_diff": max_diff, "mean_logit_diff": diff_sum / (n * ncls),
        "compared": name,
    }


def verify_onnx(model: nn.Module, onnx_path: str | Path, loader: Iterable[Any], *,
                max_batches: int | None = None, threads: int | None = None) -> dict[str, Any]:
    """Compare ``model`` with the ONNX file in onnxruntime on ``loader``'s batches.

    ``loader`` yields ``(images, labels)`` (or images alone: no top-1 then). Returns ``images``,
    ``torch_top1``, ``onnx_top1``, ``top1_diff`` (points), ``agreement`` (% same class),
    ``max_logit_diff``, ``mean_logit_diff`` and ``identical_logits`` (% images with
    bit-identical logits).
    """
    sess = make_session(onnx_path, threads)
    inp = sess.get_inputs()[0].name

    def run(x: Tensor) -> np.ndarray:
        return sess.run(None, {inp: x.cpu().numpy()})[0]

    res = _compare(model, run, loader, max_batches, "onnx")
    res["file"] = str(onnx_path)
    return res


def verify_packed(model: nn.Module, packed_path: str | Path, loader: Iterable[Any], *,
                  max_batches: int | None = None) -> dict[str, Any]:
    """Compare ``model`` with the model reloaded from a packed file (expected: identical)."""
    from mpqkit.export.packed import load_packed

    loaded = load_packed(packed_path)

    @torch.no_grad()
    def run(x: Tensor) -> np.ndarray:
        return loaded(x).float().numpy()

    res = _compare(model.cpu(), run, loader, max_batches, "packed")
    res["file"] = str(packed_path)
    return res


def verify_export(model: nn.Module, meta: Mapping[str, Any], path: str | Path, fmt: str,
                  data: DataConfig | Mapping[str, Any] | None = None,
                  threads: int | None = None) -> dict[str, Any]:
    """Compare an export (``fmt``: ``onnx`` or ``packed``) with ``model`` on a test split.

    ``model`` and ``meta`` are the checkpoint's (as :func:`~mpqkit.export.export_checkpoint`
    returns them). ``data``: a :class:`~mpqkit.data.DataConfig`, or a dict of its fields (the
    dataset name defaults to the checkpoint's); its class count must match the checkpoint's.
    ``threads``: onnxruntime intra-op threads.
    """
    from mpqkit.data import DataConfig, build_data, make_loader
    from mpqkit.engine.checkpoint import check_classes
    from mpqkit.engine.config import from_dict

    if data is None or isinstance(data, Mapping):
        d = {"name": meta.get("dataset") or "cifar10", **(data or {})}
        cfg = from_dict(DataConfig, d, "data")
    else:
        cfg = data
    bundle = build_data(cfg)
    check_classes(meta, bundle.num_classes, bundle.name, "the checkpoint",
                  "verify on the dataset it was trained on (--data)")
    loader = make_loader(bundle.test, cfg.eval_batch_size, train=False, workers=cfg.workers)
    if fmt == "packed":
        return verify_packed(model, path, loader)
    return verify_onnx(model, path, loader, threads=threads)


def check_verification(result: dict[str, Any], tolerance: float = 0.1) -> None:
    """Raise :class:`VerificationError` (one line) if top-1 differs by more than ``tolerance``
    points; without labels, if more than ``tolerance`` % of the predicted classes differ."""
    name = result.get("compared", "onnx")
    if result.get("top1_diff") is not None:
        if result["top1_diff"] > tolerance:
            raise VerificationError(
                f"{name} top-1 {result[f'{name}_top1']:.2f}% differs from PyTorch "
                f"{result['torch_top1']:.2f}% by {result['top1_diff']:.2f} points (> {tolerance}"
                f" allowed) on {result['images']} images (class agreement "
                f"{result['agreement']:.2f}%, max logit diff {result['max_logit_diff']:.4g}): "
                "the exported model does not compute what the PyTorch model computes")
        return
    if 100.0 - result["agreement"] > tolerance:
        raise VerificationError(
            f"{name} and PyTorch predict different classes on {result['disagreements']} of "
            f"{result['images']} images ({100 - result['agreement']:.2f}% > {tolerance}% "
            f"allowed; max logit diff {result['max_logit_diff']:.4g}): the exported model does "
            "not compute what the PyTorch model computes")


def format_verification(result: dict[str, Any]) -> str:
    """One line summarising a verification result."""
    name = result.get("compared", "onnx")
    s = f"verified on {result['images']} images: "
    if result.get("top1_diff") is not None:
        s += (f"top-1 PyTorch {result['torch_top1']:.2f}% vs {name} {result[f'{name}_top1']:.2f}%"
              f" (diff {result['top1_diff']:.2f} points), ")
    s += (f"class agreement {result['agreement']:.2f}%, max logit diff "
          f"{result['max_logit_diff']:.4g}, identical logits {result['identical_logits']:.1f}%")
    return s
