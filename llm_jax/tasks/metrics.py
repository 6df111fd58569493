"""Classification metrics from summed confusion matrices: accuracy, macro F1, per-class precision/recall.

Confusion counts are sums, so they add up exactly over batches, processes and evaluation shards.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion(predictions: jax.Array, labels: jax.Array, weights: jax.Array, num_labels: int) -> jax.Array:
    """[num_labels (true), num_labels (predicted)] weighted counts of any-shaped predictions and labels."""
    true_NC = jax.nn.one_hot(labels.reshape(-1), num_labels) * weights.reshape(-1, 1)
    predicted_NC = jax.nn.one_hot(predictions.reshape(-1), num_labels)
    return true_NC.T @ predicted_NC


def per_class(confusion_CC: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, f1, support) per class; 0 where a class was never predicted or never seen."""
    confusion_CC = np.asarray(confusion_CC, np.float64)
    true_positive = np.diag(confusion_CC)
    predicted, support = confusion_CC.sum(0), confusion_CC.sum(1)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return precision, recall, f1, support


def classification_metrics(confusion_CC: np.ndarray) -> dict[str, float]:
    """eval/accuracy and eval/f1 (macro over the classes that occur in the labels or the predictions)."""
    confusion_CC = np.asarray(confusion_CC, np.float64)
    total = max(confusion_CC.sum(), 1.0)
    _, _, f1, support = per_class(confusion_CC)
    present = (support > 0) | (confusion_CC.sum(0) > 0)
    macro_f1 = float(f1[present].mean()) if present.any() else 0.0
    return {"eval/accuracy": float(np.trace(confusion_CC) / total), "eval/f1": macro_f1}


def class_report(confusion_CC: np.ndarray, names: Sequence[str]) -> str:
    """A per-class precision / recall / F1 / support table (what `evaluate` prints)."""
    precision, recall, f1, support = per_class(confusion_CC)
    width = max([len(str(name)) for name in names] + [5])
    lines = [f"{'class':<{width}}  precision  recall     f1  support"]
    for i, name in enumerate(names):
        lines.append(f"{str(name):<{width}}  {precision[i]:9.4f}  {recall[i]:6.4f}  {f1[i]:6.4f}  {int(support[i]):7d}")
    return "\n".join(lines)


def per_class_metrics(confusion_CC: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """eval/precision/NAME and eval/recall/NAME for every class."""
    precision, recall, _, _ = per_class(confusion_CC)
    metrics = {}
    for i, name in enumerate(names):
        metrics[f"eval/precision/{name}"] = float(precision[i])
        metrics[f"eval/recall/{name}"] = float(recall[i])
    return metrics


def weighted_cross_entropy(logits_NC: jax.Array, labels_N: jax.Array, weights_N: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
    """(weighted loss sum, weight sum) of class predictions."""
    import optax

    losses_N = optax.softmax_cross_entropy_with_integer_labels(logits_NC, labels_N)
    return jnp.sum(losses_N * weights_N), jnp.sum(weights_N)
