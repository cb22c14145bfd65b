"""The training loss and accuracy of a split model's output, for classification and sequences.

A model's last block outputs ``(b, C)`` logits for ``b`` samples with ``(b,)`` labels
(classification), or ``(b, *positions, C)`` logits with ``(b, *positions)`` labels: a language
model's next-token logits ``(b, T, V)`` against the next tokens ``(b, T)``. A *sample* is a
row (an image, a sequence); its loss is the cross-entropy of its label, or the mean
cross-entropy over its positions, so that a batch's mean loss is the usual mean token loss
whenever sequences have one length. Its accuracy is 1 or 0, or the fraction of its positions
predicted right.

Every rule of ``flsplit.runtime.server`` (and the centralized evaluation) reads the loss from
here, so a scheme's server step and its unsplit reference compute the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["sample_losses", "loss_sum", "mean_loss", "correct"]


def sample_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each sample's loss, shape ``(b,)``: its cross-entropy, mean over its positions."""
    if logits.dim() == 2:
        return nn.functional.cross_entropy(logits, y, reduction="none")
    # cross_entropy takes the classes in dimension 1: (b, C, *positions) against (b, *positions)
    per_position = nn.functional.cross_entropy(logits.movedim(-1, 1), y, reduction="none")
    return per_position.flatten(1).mean(1)


def loss_sum(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed loss of a batch's samples (its mean: ``loss_sum / b``)."""
    if logits.dim() == 2:  # torch's own sum reduction: the classification numbers stay bit for bit
        return nn.functional.cross_entropy(logits, y, reduction="sum")
    return sample_losses(logits, y).sum()


def mean_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The mean loss over a batch's samples (the mean token loss for equal-length sequences)."""
    if logits.dim() == 2:  # torch's own mean reduction: the classification numbers stay bit for bit
        return nn.functional.cross_entropy(logits, y)
    return sample_losses(logits, y).mean()


def correct(logits: torch.Tensor, y: torch.Tensor) -> float:
    """How many samples the logits predict right (a sequence counts its fraction of right positions)."""
    hits = logits.argmax(-1) == y
    if hits.dim() == 1:
        return float(hits.sum())
    return float(hits.flatten(1).double().mean(1).sum())
