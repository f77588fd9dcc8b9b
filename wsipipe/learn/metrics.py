"""Classifier metrics on held-out predictions (pure numpy): AUC, accuracy, sensitivity,
specificity, confusion matrix, expected calibration error.

``probs`` is (N,) for a one-logit binary model (P(class 1)) or (N, C) softmax rows."""

from __future__ import annotations

import numpy as np


def _as_matrix(probs: np.ndarray) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    return np.stack([1.0 - probs, probs], axis=1) if probs.ndim == 1 else probs


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) statistic, ties counted half; nan if one class is absent."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Binary AUC, or the macro one-vs-rest AUC over classes present for (N, C) probabilities."""
    p = _as_matrix(probs)
    labels = np.asarray(labels)
    if p.shape[1] == 2:
        return binary_auc(p[:, 1], labels == 1)
    values = [binary_auc(p[:, c], labels == c) for c in range(p.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> float:
    """|confidence - accuracy| averaged over equal-width confidence bins, weighted by bin size."""
    p = _as_matrix(probs)
    confidence, predicted = p.max(axis=1), p.argmax(axis=1)
    correct = predicted == np.asarray(labels)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(confidence[sel].mean() - correct[sel].mean())
    return float(ece)


def balanced_log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present of each class's mean -log P(true class): the loss the
    class-balanced training minimises, on held-out patches (nan for none)."""
    p = _as_matrix(probs)
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels):
        return float("nan")
    nll = -np.log(np.clip(p[np.arange(len(labels)), labels], 1e-7, 1.0))
    return float(np.mean([nll[labels == c].mean() for c in np.unique(labels)]))


THRESHOLD_METRICS = ("balanced_accuracy", "dice")


def choose_threshold(probs: np.ndarray, labels: np.ndarray, metric: str = "balanced_accuracy",
                     positive: int = -1) -> tuple[float, float] | None:
    """The probability threshold of class ``positive`` (vs the rest) that maximises ``metric`` on
    these patches, and the value reached; None when one side is absent.

    ``metric``: ``balanced_accuracy`` (mean of sensitivity and specificity) or ``dice`` (F1 of
    the positive class). Predictions are ``p >= t``; every t between two neighbouring scores
    gives the same predictions, so of the best run of such intervals the middle is returned
    (a model that separates the classes gets the middle of the gap, not its edge)."""
    p = _as_matrix(probs)
    pos = positive % p.shape[1]
    s, truth = p[:, pos], np.asarray(labels) == pos
    if metric not in THRESHOLD_METRICS:
        from wsipipe.errors import ParameterError

        raise ParameterError(None, f"threshold metric must be one of {THRESHOLD_METRICS}, got {metric!r}")
    if truth.all() or not truth.any():
        return None
    u = np.unique(s)
    if len(u) < 2:
        return float(u[0]), float("nan")
    upper = u[1:]  # interval i = (u[i], u[i+1]]: predicted positive = s >= u[i+1]
    pos_sorted, neg_sorted = np.sort(s[truth]), np.sort(s[~truth])
    tp = len(pos_sorted) - np.searchsorted(pos_sorted, upper, "left")
    fp = len(neg_sorted) - np.searchsorted(neg_sorted, upper, "left")
    fn, tn = len(pos_sorted) - tp, len(neg_sorted) - fp
    dice = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    value = dice if metric == "dice" else 0.5 * (tp / len(pos_sorted) + tn / len(neg_sorted))
    best = np.flatnonzero(value >= value.max() - 1e-12)
    end = best[0]
    while end + 1 in best:
        end += 1
    return float((u[best[0]] + u[end + 1]) / 2), float(value.max())


def classification_metrics(probs: np.ndarray, labels: np.ndarray, positive: int = -1,
                           threshold: float | None = None) -> dict:
    """AUC, accuracy, confusion matrix (rows = truth), ECE; sensitivity / specificity of
    class ``positive`` (default: the last, 'Tumor') against the rest.

    Predictions are the most probable class, or with ``threshold`` class ``positive`` where its
    probability is at least ``threshold`` and the most probable other class elsewhere."""
    p = _as_matrix(probs)
    labels = np.asarray(labels, dtype=np.int64)
    n_classes = p.shape[1]
    predicted = p.argmax(axis=1)
    if threshold is not None:
        pos = positive % n_classes
        others = p.copy()
        others[:, pos] = -np.inf
        predicted = np.where(p[:, pos] >= threshold, pos, others.argmax(axis=1))
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    pos = positive % n_classes
    tp = confusion[pos, pos]
    fn = confusion[pos].sum() - tp
    fp = confusion[:, pos].sum() - tp
    tn = confusion.sum() - tp - fn - fp

    def ratio(a, b):
        return float(a / b) if b else float("nan")

    return {
        "n": int(len(labels)),
        "auc": auc(probs, labels),
        "accuracy": ratio(np.trace(confusion), confusion.sum()),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ece": expected_calibration_error(p, labels),
        "confusion_matrix": confusion.tolist(),
        "positive_class_index": int(pos),
        "threshold": threshold,
    }
