"""Multi-label classification metrics: per-class and macro ROC AUC (scikit-learn's ``roc_auc_score``).

A class whose targets take a single value in the evaluated set (always present or always absent) has no ROC
curve: its AUC is NaN and it is left out of the macro mean (``auc_macro`` is the mean over the scorable classes,
``num_scored`` says how many). A set where no class is scorable is an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

__all__ = ["multilabel_auc"]


def _as_array(value: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().double().numpy()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must have shape [N >= 1, K >= 1], got {array.shape}")
    return array


def multilabel_auc(scores: Tensor | np.ndarray, targets: Tensor | np.ndarray,
                   class_names: Sequence[str] | None = None) -> dict[str, float]:
    """ROC AUC of each class and their macro mean.

    Args:
        scores: ``[N, K]`` real scores (logits or probabilities; higher = more likely present), finite.
        targets: ``[N, K]`` binary targets (0 / 1).
        class_names: ``K`` names for the per-class keys (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{"auc_macro": mean over scorable classes, "num_scored": float count, "auc_<name>": per class}`` (a
        class with a single target value in the set has ``auc_<name> = NaN`` and is not in the mean). Ties count
        one half (``roc_auc_score``).

    Raises:
        ValueError: shapes that differ or are not ``[N, K]``, non-binary targets, non-finite scores, wrong
            ``class_names`` length, or no class with both target values.
    """
    from sklearn.metrics import roc_auc_score

    s, t = _as_array(scores, "scores"), _as_array(targets, "targets")
    if s.shape != t.shape:
        raise ValueError(f"scores and targets must have the same shape [N, K], got {s.shape} and {t.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores contains non-finite values (NaN or inf)")
    if not np.isin(t, (0.0, 1.0)).all():
        raise ValueError("targets must be binary (0 or 1)")
    names = [str(k) for k in range(s.shape[1])] if class_names is None else [str(n) for n in class_names]
    if len(names) != s.shape[1]:
        raise ValueError(f"class_names must name the {s.shape[1]} classes, got {len(names)} names")
    out: dict[str, float] = {}
    per_class = []
    for k, name in enumerate(names):
        column = t[:, k]
        auc = math.nan if column.min() == column.max() else float(roc_auc_score(column, s[:, k]))
        out[f"auc_{name}"] = auc
        per_class.append(auc)
    scored = [a for a in per_class if not math.isnan(a)]
    if not scored:
        raise ValueError(f"no class is scorable: every class has a single target value in these {s.shape[0]} "
                         "samples (AUC needs positives and negatives)")
    return {"auc_macro": float(np.mean(scored)), "num_scored": float(len(scored)), **out}
