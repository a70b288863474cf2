"""The ARRA objective: next-token CE + lambda * GVA (+ z-loss), around any HF causal LM.

GVA (global visual alignment) takes `hidden_states[align_layer]` at the positions that predict
image tokens, maps them through a 2-layer MLP projector to the teacher's width and pulls them
towards the teacher's global feature of the target image: mean over those positions of
1 - cos (or MSE). Each term is switched independently; with lambda = 0 there is no projector and
the run is the plain AR baseline (in the official code GVA silently vanishes when z-loss is 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.lm.objective import Objective
from pipeline.options import OptionError
from pipeline.data.train_data import IGNORE


class Projector(nn.Sequential):
    """Linear(d_model -> hidden) -> GELU -> Linear(hidden -> teacher_dim), as the official adaptor."""

    def __init__(self, d_model: int, hidden: int, teacher_dim: int):
        super().__init__(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, teacher_dim))


def gva_loss(student: torch.Tensor, target: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Mean over aligned positions (rows of MxD) of 1 - cos, or of the squared error."""
    student, target = student.float(), target.float()
    if kind == "cosine":
        return (1 - F.cosine_similarity(student, target, dim=-1)).mean()
    return (student - target).pow(2).mean()


class ARRAModel(nn.Module):
    def __init__(self, lm: nn.Module, teacher_dim: int | None, objective: Objective = Objective()):
        super().__init__()
        objective.check_depth(lm.config.num_hidden_layers)
        self.lm, self.objective, self.projector = lm, objective, None
        if objective.lam > 0:
            if not teacher_dim:
                raise OptionError("GVA (--lambda > 0) needs a teacher column; pass --teacher or --lambda 0")
            self.projector = Projector(lm.config.hidden_size, objective.projector_hidden or teacher_dim, teacher_dim)

    def forward(self, input_ids, attention_mask, labels, align_mask=None, teacher=None, position_ids=None):
        """position_ids: None numbers each row 0, 1, ...; a 2D-RoPE layout's batches carry their own."""
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      output_hidden_states=self.projector is not None, use_cache=False)
        logits = out.logits[:, :-1].float()
        targets = labels[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
        loss, metrics = ce, {"ce": ce.detach()}
        if self.objective.z_loss > 0:
            valid = targets != IGNORE
            z = (torch.logsumexp(logits, dim=-1).pow(2) * valid).sum() / valid.sum().clamp(min=1)
            loss = loss + self.objective.z_loss * z
            metrics["z"] = z.detach()
        if self.projector is not None:
            # only the masked positions go through the projector: never text, padding or <eoi>
            hidden = out.hidden_states[self.objective.align_layer][align_mask]
            target = teacher[align_mask.nonzero(as_tuple=True)[0]]
            gva = gva_loss(self.projector(hidden), target, self.objective.align_loss)
            loss = loss + self.objective.lam * gva
            metrics["gva"] = gva.detach()
        metrics["loss"] = loss.detach()
        return loss, metrics
