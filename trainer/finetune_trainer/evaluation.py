"""Evaluation on the held-out set: every rank evaluates its share, and the sums are reduced exactly.

Rank r takes examples r, r + world_size, ... so every example is counted once whatever the world size
(no padding, no repetition). The model is in eval mode under no_grad, so no dropout draws from the RNG
and training resumes exactly as if no evaluation had run. Metrics have Hugging Face Trainer's names:
eval_loss (mean over supervised tokens, or examples for classification), eval_perplexity (causal-lm),
eval_accuracy and eval_f1 (macro, over the classes that occur in the targets or the predictions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .batching import Collator
from .data import Example
from .model import SupervisedLoss


def evaluate(
    loss_module: SupervisedLoss,
    examples: list[Example],
    collator: Collator,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    reduce: Callable[[list[float]], list[float]],
    num_labels: int | None = None,
) -> dict[str, float]:
    """The eval metrics over all ranks' shares (a collective: every rank calls it)."""
    share = examples[rank::world_size]
    classes = num_labels or 0
    loss_sum, counted, correct = 0.0, 0, 0
    true_positive, predicted, actual = [0] * classes, [0] * classes, [0] * classes
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    was_training = loss_module.training
    loss_module.eval()
    try:
        with torch.no_grad(), autocast:
            for start in range(0, len(share), batch_size):
                batch = collator(share[start : start + batch_size])
                counts: dict[str, int] = batch.pop("counts")
                inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if num_labels:
                    logits = loss_module.peft_model(
                        input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
                    ).logits.float()
                    targets = inputs["targets"]
                    loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
                    predictions = logits.argmax(-1)
                    correct += int((predictions == targets).sum())
                    for target, prediction in zip(targets.tolist(), predictions.tolist(), strict=True):
                        actual[target] += 1
                        predicted[prediction] += 1
                        true_positive[target] += int(target == prediction)
                else:
                    loss_sum += loss_module(**inputs).item()
                counted += counts["supervised"]
    finally:
        loss_module.train(was_training)
    totals = reduce([loss_sum, counted, correct, *true_positive, *predicted, *actual])
    total_loss, total_counted, total_correct = totals[0], totals[1], totals[2]
    loss = total_loss / total_counted if total_counted else float("nan")
    metrics = {"eval_loss": loss}
    if num_labels:
        tp, pred, act = (totals[3 + i * classes : 3 + (i + 1) * classes] for i in range(3))
        present = [c for c in range(classes) if pred[c] or act[c]]
        metrics["eval_accuracy"] = total_correct / total_counted if total_counted else float("nan")
        metrics["eval_f1"] = sum(2 * tp[c] / (pred[c] + act[c]) for c in present) / len(present) if present else 0.0
    else:
        metrics["eval_perplexity"] = math.exp(min(loss, 700.0))
    return metrics
