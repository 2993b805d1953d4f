"""Classification fine-tuning on the engine (:class:`ClassificationTask`, :class:`ClassificationValidator`) and the
linear probe (:func:`linear_probe`), scored by held-out macro / per-class ROC AUC beside trivial baselines.

A held-out AUC means little alone (a class can be predictable from the crop's brightness alone), so every report
holds three groups of :func:`medgauss.metrics.classification.multilabel_auc` metrics on the same held-out set:

- ``model``: the fine-tuned classifier (or the linear probe on frozen encoder features);
- ``prior``: a constant score per class (the training prevalence): AUC 0.5 for every scorable class by definition,
  reported so the table reads against chance;
- ``intensity_histogram``: a non-learned-feature baseline, scikit-learn ``LogisticRegression`` (one per class, on
  standardised features) on a 32-bin intensity histogram of each crop, fitted on the training crops. A learned
  representation is worth something only above it.

The linear probe fits once, in closed-form-like fashion (L-BFGS on a convex logistic loss), on features of a frozen
encoder: there is nothing to optimise by gradient through the encoder, so it does not use the training engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from medgauss.metrics.classification import multilabel_auc
from medgauss.nets.classification import ViTClassifier, classifier_from_encoder
from medgauss.nets.vit3d import ViT3D

__all__ = [
    "BASELINES",
    "ClassificationReport",
    "ClassificationTask",
    "ClassificationValidator",
    "extract_features",
    "fit_logistic",
    "intensity_histograms",
    "linear_probe",
]

BASELINES = ("prior", "intensity_histogram")


class ClassificationTask:
    """Multi-label fine-tuning step: ``loss = BCEWithLogits(model(images), targets)`` (mean over labels and batch).

    Batches: ``{"image": [B, 1, D, H, W], "target": [B, K] in {0, 1}}`` (:mod:`medgauss.data.classification`).
    ``compute_loss`` returns ``(loss, logits [B, K])``.
    """

    loss_label = "BCE-with-logits"
    loss_tag = "bce"

    def compute_loss(self, model: nn.Module, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(BCE-with-logits loss, logits)`` of one micro-batch."""
        images = batch["image"].to(device, non_blocking=True)
        targets = batch["target"].to(device, non_blocking=True).float()
        logits = model(images)
        if logits.shape != targets.shape:
            raise ValueError(f"the model's logits {tuple(logits.shape)} do not match the targets "
                             f"{tuple(targets.shape)} (model num_classes vs the data's labels)")
        return F.binary_cross_entropy_with_logits(logits.float(), targets), logits.detach()


def intensity_histograms(images: Tensor, bins: int = 32, value_range: tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """Normalised intensity histogram of each image: ``[N, C, D, H, W] -> [N, bins]`` float64 (rows sum to 1;
    values outside ``value_range`` are clamped into the end bins)."""
    if not isinstance(images, Tensor) or images.ndim != 5 or images.shape[0] == 0:
        raise ValueError(f"images must be [N >= 1, C, D, H, W], got {tuple(getattr(images, 'shape', ()))}")
    if int(bins) != bins or bins < 2:
        raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
    low, high = float(value_range[0]), float(value_range[1])
    if not low < high:
        raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}")
    flat = images.detach().double().reshape(images.shape[0], -1).clamp(low, high)
    index = ((flat - low) / (high - low) * bins).long().clamp_(0, int(bins) - 1)
    counts = torch.zeros(images.shape[0], int(bins), dtype=torch.float64)
    counts.scatter_add_(1, index, torch.ones_like(flat))
    return counts / flat.shape[1]


def fit_logistic(train_x: Tensor | np.ndarray, train_y: Tensor | np.ndarray, test_x: Tensor | np.ndarray, *,
                 C: float = 1.0, max_iter: int = 2000) -> tuple[np.ndarray, dict[str, Any]]:
    """One-vs-rest logistic regression on standardised features; scores of ``test_x``.

    Each class ``k`` gets its own scikit-learn ``LogisticRegression(C=C)`` on ``(x - mean) / std`` (training
    statistics; a constant feature gets std 1). A class with a single value in ``train_y`` cannot be fitted: its
    score is that constant (it then scores AUC 0.5, like the prior).

    Args:
        train_x: ``[N, F]`` features; ``train_y``: ``[N, K]`` binary targets; ``test_x``: ``[M, F]``.
        C: inverse L2 regularisation strength (> 0).

    Returns:
        ``(scores [M, K] float64 decision values, {"coef": [K, F], "intercept": [K], "feature_mean": [F],
        "feature_std": [F], "constant_classes": [k...]})`` (plain lists, JSON-ready).
    """
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(train_x.detach().cpu().double() if isinstance(train_x, Tensor) else train_x, dtype=np.float64)
    y = np.asarray(train_y.detach().cpu().double() if isinstance(train_y, Tensor) else train_y, dtype=np.float64)
    t = np.asarray(test_x.detach().cpu().double() if isinstance(test_x, Tensor) else test_x, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or t.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[1] != t.shape[1]:
        raise ValueError(f"train_x [N, F], train_y [N, K] and test_x [M, F] do not fit: {x.shape}, {y.shape}, "
                         f"{t.shape}")
    if not C > 0:
        raise ValueError(f"C must be > 0, got {C!r}")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    xs, ts = (x - mean) / std, (t - mean) / std
    scores = np.zeros((t.shape[0], y.shape[1]))
    coef = np.zeros((y.shape[1], x.shape[1]))
    intercept = np.zeros(y.shape[1])
    constant = []
    for k in range(y.shape[1]):
        column = y[:, k]
        if column.min() == column.max():
            constant.append(k)
            intercept[k] = math.inf if column[0] == 1 else -math.inf
            scores[:, k] = column[0]
            continue
        clf = LogisticRegression(C=float(C), max_iter=int(max_iter))
        clf.fit(xs, column.astype(int))
        scores[:, k] = clf.decision_function(ts)
        coef[k], intercept[k] = clf.coef_[0], clf.intercept_[0]
    info = {"coef": coef.tolist(), "intercept": [None if math.isinf(v) else float(v) for v in intercept],
            "feature_mean": mean.tolist(), "feature_std": std.tolist(), "constant_classes": constant}
    return scores, info


@torch.no_grad()
def extract_features(model: ViTClassifier, images: Tensor, batch_size: int = 8) -> Tensor:
    """``model.features`` of ``images [N, 1, D, H, W]`` in eval mode, in batches: ``[N, C]`` float64 on the CPU
    (the model's train / eval mode is restored)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        parts = [model.features(images[i:i + batch_size].to(device)).double().cpu()
                 for i in range(0, images.shape[0], int(batch_size))]
    finally:
        model.train(was_training)
    return torch.cat(parts)


@dataclass
class ClassificationReport:
    """Held-out AUCs of the model and the baselines (module doc).

    Attributes:
        metrics: ``{"model" | "prior" | "intensity_histogram": multilabel_auc(...)}``.
        class_names: the ``K`` label names (the per-class keys are ``auc_<name>``).
        num_crops: held-out samples.
        prevalence: ``{"train": [K], "heldout": [K]}`` positive fractions.
        kind: ``"finetune"`` or ``"linear_probe"`` (what the ``model`` group is).
        probe: the linear probe's fitted coefficients (:func:`fit_logistic`'s info), ``None`` for fine-tuning.
    """

    metrics: dict[str, dict[str, float]]
    class_names: list[str]
    num_crops: int
    prevalence: dict[str, list[float]]
    kind: str = "finetune"
    probe: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def headline(self) -> tuple[str, float]:
        """``("auc_macro", model macro AUC)``: TensorBoard ``val/auc_macro``."""
        return "auc_macro", self.metrics["model"]["auc_macro"]

    @property
    def margin(self) -> float:
        """Model macro AUC minus the intensity-histogram baseline's."""
        return self.metrics["model"]["auc_macro"] - self.metrics["intensity_histogram"]["auc_macro"]

    def summary(self) -> str:
        """One line: macro AUC of each predictor, the classes scored and the verdict."""
        m = self.metrics
        what = "linear probe" if self.kind == "linear_probe" else "model"
        verdict = (f"beats the intensity histogram by {self.margin:+.3f}" if self.margin > 0
                   else f"does NOT beat the intensity histogram ({self.margin:+.3f})")
        per_class = " ".join(f"{n} {m['model'][f'auc_{n}']:.2f}" for n in self.class_names
                             if not math.isnan(m["model"][f"auc_{n}"]))
        return (f"held-out macro AUC {what} {m['model']['auc_macro']:.3f} | prior {m['prior']['auc_macro']:.3f} | "
                f"intensity_histogram {m['intensity_histogram']['auc_macro']:.3f} | "
                f"{int(m['model']['num_scored'])}/{len(self.class_names)} classes scored, {self.num_crops} crops: "
                f"{what} {verdict} | per class: {per_class}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (NaN AUCs of unscorable classes become ``None``)."""
        clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v  # noqa: E731
        return {"metrics": {g: {k: clean(v) for k, v in m.items()} for g, m in self.metrics.items()},
                "kind": self.kind, "class_names": self.class_names, "num_crops": self.num_crops,
                "prevalence": self.prevalence, "margin_over_histogram": self.margin}


def _check_set(images: Tensor, targets: Tensor, name: str) -> tuple[Tensor, Tensor]:
    if not isinstance(images, Tensor) or images.ndim != 5 or images.shape[0] == 0:
        raise ValueError(f"{name}_images must be [N >= 1, C, D, H, W], got {tuple(getattr(images, 'shape', ()))}")
    if not isinstance(targets, Tensor) or targets.ndim != 2 or targets.shape[0] != images.shape[0]:
        raise ValueError(f"{name}_targets must be [N={images.shape[0]}, K], got "
                         f"{tuple(getattr(targets, 'shape', ()))}")
    if not bool(torch.isin(targets.float(), torch.tensor([0.0, 1.0])).all()):
        raise ValueError(f"{name}_targets must be binary (0 or 1)")
    return images.detach().float().cpu(), targets.detach().float().cpu()


class _Baselines:
    """Held-out scores of the prior and the intensity-histogram baseline (fitted once)."""

    def __init__(self, train_images: Tensor, train_targets: Tensor, val_images: Tensor, val_targets: Tensor,
                 class_names: list[str], hist_bins: int, value_range: tuple[float, float], C: float) -> None:
        prior = train_targets.double().mean(dim=0)
        self.prevalence = {"train": [round(float(v), 4) for v in prior],
                           "heldout": [round(float(v), 4) for v in val_targets.double().mean(dim=0)]}
        hist_scores, _ = fit_logistic(intensity_histograms(train_images, hist_bins, value_range), train_targets,
                                      intensity_histograms(val_images, hist_bins, value_range), C=C)
        self.metrics = {
            "prior": multilabel_auc(prior.expand(val_targets.shape[0], -1), val_targets, class_names),
            "intensity_histogram": multilabel_auc(hist_scores, val_targets, class_names),
        }


class ClassificationValidator:
    """Held-out macro / per-class AUC of a classifier beside the prior and the intensity-histogram baseline.

    Args:
        images: ``[N, 1, D, H, W]`` held-out images (e.g. :func:`medgauss.data.classification.presence_crop_set`).
        targets: ``[N, K]`` binary held-out targets.
        train_images, train_targets: a fixed set of training samples ``[M, 1, D, H, W]`` / ``[M, K]`` the
            baselines are fitted on (prior = their prevalence).
        class_names: ``K`` label names (default ``"0"``, ``"1"``, ...).
        batch_size: images per forward pass.
        hist_bins, value_range: the histogram baseline's bins over ``value_range`` (the data's ``[b_min, b_max]``).
        C: the histogram baseline's inverse regularisation.

    The model maps ``[B, 1, D, H, W]`` to logits ``[B, K]``. Evaluation draws no random numbers and leaves the
    model's mode as it found it.
    """

    def __init__(self, images: Tensor, targets: Tensor, *, train_images: Tensor, train_targets: Tensor,
                 class_names: Sequence[str] | None = None, batch_size: int = 8, hist_bins: int = 32,
                 value_range: tuple[float, float] = (0.0, 1.0), C: float = 1.0) -> None:
        self.images, self.targets = _check_set(images, targets, "val")
        train_images, train_targets = _check_set(train_images, train_targets, "train")
        if train_targets.shape[1] != self.targets.shape[1]:
            raise ValueError(f"train_targets has {train_targets.shape[1]} labels, targets {self.targets.shape[1]}")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        k = self.targets.shape[1]
        self.class_names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
        if len(self.class_names) != k:
            raise ValueError(f"class_names must name the {k} labels, got {len(self.class_names)}")
        self.batch_size = int(batch_size)
        self.baselines = _Baselines(train_images, train_targets, self.images, self.targets, self.class_names,
                                    hist_bins, tuple(value_range), C)

    @property
    def num_crops(self) -> int:
        return int(self.images.shape[0])

    @torch.no_grad()
    def scores(self, model: nn.Module) -> Tensor:
        """Held-out logits ``[N, K]`` (float64, CPU) of ``model`` in eval mode (its mode restored)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        try:
            parts = [model(self.images[i:i + self.batch_size].to(device)).double().cpu()
                     for i in range(0, self.num_crops, self.batch_size)]
        finally:
            model.train(was_training)
        return torch.cat(parts)

    def evaluate(self, model: nn.Module, *, final: bool = True) -> ClassificationReport:
        """Score ``model`` beside the baselines (``final`` changes nothing: every metric is cheap)."""
        metrics = {"model": multilabel_auc(self.scores(model), self.targets, self.class_names),
                   **self.baselines.metrics}
        return ClassificationReport(metrics, self.class_names, self.num_crops, self.baselines.prevalence)


def linear_probe(encoder: ViT3D | ViTClassifier, train_images: Tensor, train_targets: Tensor, val_images: Tensor,
                 val_targets: Tensor, *, C: float = 1.0, pooling: str = "mean", batch_size: int = 8,
                 class_names: Sequence[str] | None = None, hist_bins: int = 32,
                 value_range: tuple[float, float] = (0.0, 1.0), max_iter: int = 2000) -> ClassificationReport:
    """Linear probe: one-vs-rest logistic regression on frozen, standardised encoder features.

    Features are :meth:`ViTClassifier.features` (``pooling`` of the encoder's tokens) of a frozen copy of
    ``encoder`` (a :class:`ViT3D`; a :class:`ViTClassifier` is used as it is, with its own pooling); each label
    gets a scikit-learn ``LogisticRegression(C=C)`` (:func:`fit_logistic`). The report is the validator's: the
    probe's held-out AUCs as ``model``, beside ``prior`` and ``intensity_histogram`` on the same sets, with the
    probe's coefficients in ``report.probe``.

    Args:
        encoder: the (pretrained) encoder, unchanged by the call.
        train_images, train_targets: ``[N, 1, D, H, W]`` (the encoder's ``img_size``) / ``[N, K]`` binary.
        val_images, val_targets: ``[M, 1, D, H, W]`` / ``[M, K]`` held-out.
        C: inverse L2 regularisation of each logistic regression.
        pooling, batch_size, class_names, hist_bins, value_range, max_iter: as named.

    Raises:
        ValueError: a bad encoder or mismatched sets.
    """
    train_images, train_targets = _check_set(train_images, train_targets, "train")
    val_images, val_targets = _check_set(val_images, val_targets, "val")
    k = train_targets.shape[1]
    if val_targets.shape[1] != k:
        raise ValueError(f"train_targets has {k} labels but val_targets {val_targets.shape[1]}")
    if isinstance(encoder, ViTClassifier):
        model = encoder
    elif isinstance(encoder, ViT3D):
        model = classifier_from_encoder(encoder, k, pooling=pooling, freeze_encoder=True)
    else:
        raise ValueError(f"encoder must be a ViT3D or a ViTClassifier, got {type(encoder).__name__}")
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"class_names must name the {k} labels, got {len(names)}")
    train_features = extract_features(model, train_images, batch_size)
    val_features = extract_features(model, val_images, batch_size)
    scores, info = fit_logistic(train_features, train_targets, val_features, C=C, max_iter=max_iter)
    baselines = _Baselines(train_images, train_targets, val_images, val_targets, names, hist_bins,
                           tuple(value_range), C)
    metrics = {"model": multilabel_auc(scores, val_targets, names), **baselines.metrics}
    return ClassificationReport(metrics, names, int(val_images.shape[0]), baselines.prevalence, kind="linear_probe",
                                probe={**info, "C": float(C), "pooling": model.pooling,
                                       "num_train": int(train_images.shape[0])})
