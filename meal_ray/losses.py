"""MEAL V2 losses (arXiv 2009.08453, and the authors' code): soft cross-entropy + discriminator loss, one backward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def soft_cross_entropy(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """-(1/B) sum_i sum_c p_e[i,c] log_softmax(z_s)[i,c]; equals KL(p_e || p_s) up to a constant. T = 1."""
    return -(teacher_probs.float() * F.log_softmax(student_logits.float(), dim=1)).sum(dim=1).mean()


def hard_label_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                             labels_b: Optional[torch.Tensor] = None, lam: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Cross-entropy with integer labels; with CutMix, lam * CE(labels) + (1 - lam) * CE(labels_b).

    ``lam`` is one number for a batch mixed with one box, or one per sample for replayed mixes.
    """
    if isinstance(lam, torch.Tensor):
        lam = lam.to(logits.device, torch.float32)
        a = F.cross_entropy(logits.float(), labels, reduction="none")
        b = F.cross_entropy(logits.float(), labels_b, reduction="none")
        return (lam * a + (1.0 - lam) * b).mean()
    loss = F.cross_entropy(logits.float(), labels)
    if labels_b is not None and lam < 1.0:
        loss = lam * loss + (1.0 - lam) * F.cross_entropy(logits.float(), labels_b)
    return loss


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


def discriminator_loss(discriminator: nn.Module, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       reverse_student_gradient: bool = False) -> torch.Tensor:
    """BCE-with-logits of the discriminator on [student; teacher] logits, targets [1,0] / [0,1], mean over 2B x 2.

    Reference behaviour: the student logits are *not* detached, so the student receives this
    loss's gradient too (a regularizer, paper section 6.3). ``reverse_student_gradient`` flips
    that gradient (MEAL v1-style adversarial variant, an option only).
    """
    s = _GradReverse.apply(student_logits) if reverse_student_gradient else student_logits
    inputs = torch.cat([s.float(), teacher_logits.detach().float()], dim=0)
    b_s, b_t = student_logits.shape[0], teacher_logits.shape[0]
    target = torch.zeros(b_s + b_t, 2, device=inputs.device)
    target[:b_s, 0] = 1.0
    target[b_s:, 1] = 1.0
    return F.binary_cross_entropy_with_logits(discriminator(inputs), target)


@dataclass
class LossParts:
    total: torch.Tensor
    soft_ce: Optional[torch.Tensor] = None
    disc: Optional[torch.Tensor] = None
    hard_ce: Optional[torch.Tensor] = None


def meal_v2_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor, teacher_logits: torch.Tensor, *,
                 discriminator: Optional[nn.Module] = None, discriminator_mode: str = "reference",
                 labels: Optional[torch.Tensor] = None, hard_label_weight: float = 0.0,
                 labels_b: Optional[torch.Tensor] = None, lam: float | torch.Tensor = 1.0) -> LossParts:
    """total = L_ce + L_d (+ hard_label_weight * CE(labels), default weight 0)."""
    soft = soft_cross_entropy(student_logits, teacher_probs)
    total = soft
    disc = hard = None
    if discriminator is not None and discriminator_mode != "off":
        disc = discriminator_loss(discriminator, student_logits, teacher_logits,
                                  reverse_student_gradient=discriminator_mode == "adversarial")
        total = total + disc
    if hard_label_weight > 0 and labels is not None:
        hard = hard_label_cross_entropy(student_logits, labels, labels_b, lam)
        total = total + hard_label_weight * hard
    return LossParts(total, soft, disc, hard)
