"""DINOv2's self-supervised losses: DINO on CLS tokens, iBOT on masked patch tokens, KoLeo on CLS features.

Constructors and methods follow Meta's `dinov2/loss/*.py` (same names, arguments and semantics), so code written
against those classes runs unchanged. When `torch.distributed` is initialised, the teacher centre and the
Sinkhorn-Knopp normalisations are all-reduced, so every rank sees the result of the whole global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _is_distributed() else 1


def _all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place over all ranks ("sum" or "max"); a no-op in a single process."""
    if _is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_output: torch.Tensor, teacher_temp: float, n_samples, n_iterations: int = 3):
    """Teacher targets by Sinkhorn-Knopp: every prototype gets the same total mass, every sample a distribution.

    teacher_output: (B_local, K) logits of this rank. n_samples: number of samples over all ranks (an int or a
    tensor). Returns (B_local, K) float32 rows that sum to 1. Same iterations as Meta's `sinkhorn_knopp_teacher`.
    """
    logits = teacher_output.float() / teacher_temp
    # Meta exponentiates directly. Subtracting each prototype's maximum over the global batch changes nothing
    # (a per-prototype factor cancels in the first row normalisation) but keeps exp() finite when the head's
    # weight norms grow. A rank may hold no sample (no masked patch): its maxima are -inf.
    if logits.shape[0] > 0:
        row_max = logits.amax(dim=0)
    else:
        row_max = logits.new_full(logits.shape[1:], float("-inf"))
    Q = torch.exp(logits - _all_reduce_(row_max, op="max")).t()  # K x B, the paper's notation
    n_prototypes = Q.shape[0]

    Q /= _all_reduce_(torch.sum(Q))
    for _ in range(n_iterations):
        Q /= _all_reduce_(torch.sum(Q, dim=1, keepdim=True))  # each prototype's total weight: 1/K
        Q /= n_prototypes
        Q /= torch.sum(Q, dim=0, keepdim=True)  # each sample's total weight: 1/B
        Q /= n_samples
    Q *= n_samples  # columns sum to 1: an assignment per sample
    return Q.t()


class _OneStepLateCenter(nn.Module):
    """Softmax-centering state shared by DINOLoss and iBOTPatchLoss: the batch sum is (all-)reduced
    asynchronously by `reduce_center_update` and folded into the EMA one step late by `apply_center_update`.
    `state_dict()` applies a pending update first, so a checkpoint taken between steps resumes exactly."""

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(*center_shape))
        self.updated = True
        self.reduce_handle = None
        self.center_count = None
        self.async_batch_center = None
        self.register_state_dict_pre_hook(_apply_pending_center_update)

    @torch.no_grad()
    def _start_center_update(self, batch_sum: torch.Tensor, count: int) -> None:
        self.updated = False
        self.center_count = count
        self.async_batch_center = batch_sum
        if _is_distributed():
            self.reduce_handle = dist.all_reduce(self.async_batch_center, async_op=True)

    @torch.no_grad()
    def apply_center_update(self):
        if self.updated is False:
            if self.reduce_handle is not None:
                self.reduce_handle.wait()
                self.reduce_handle = None
            batch_center = self.async_batch_center / (self.center_count * _world_size())
            self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
            self.updated = True


class DINOLoss(_OneStepLateCenter):
    """Cross-entropy between the teacher's centred, sharpened CLS distribution and the student's (Meta's DINOLoss).

    Centre update is one step late, as in Meta's code: `update_center` starts the (all-)reduction of the batch
    sum and the next `softmax_center_teacher` (or `apply_center_update`) folds it into the EMA. `state_dict()`
    applies a pending update first, so a checkpoint taken between steps resumes exactly.
    """

    def __init__(self, out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output, teacher_temp):
        self.apply_center_update()
        return F.softmax((teacher_output - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_iterations=3):
        # Meta assumes the same batch on every rank (drop_last=True).
        n_samples = teacher_output.shape[0] * _world_size()
        return sinkhorn_knopp(teacher_output, teacher_temp, n_samples, n_iterations)

    def forward(self, student_output_list, teacher_out_softmaxed_centered_list):
        """Sum over every (student, teacher) pair of the image-averaged cross-entropy (no normalisation)."""
        total_loss = 0
        for s in student_output_list:
            lsm = F.log_softmax(s / self.student_temp, dim=-1)
            for t in teacher_out_softmaxed_centered_list:
                total_loss -= torch.sum(t * lsm, dim=-1).mean()
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output):
        self.reduce_center_update(teacher_output)

    @torch.no_grad()
    def reduce_center_update(self, teacher_output):
        self._start_center_update(torch.sum(teacher_output.float(), dim=0, keepdim=True), len(teacher_output))


class iBOTPatchLoss(_OneStepLateCenter):  # noqa: N801 - Meta's name
    """Cross-entropy between teacher and student distributions of the masked patch tokens (Meta's iBOTPatchLoss).

    The centre has shape (1, 1, K) and is updated one step late like DINOLoss's. As in Meta's code, the batch
    centre is the mean over this rank's masked patches, then averaged over ranks (exactly the global mean when
    every rank has the same number of masked patches).
    """

    def __init__(self, patch_out_dim, student_temp=0.1, center_momentum=0.9):
        super().__init__((1, 1, patch_out_dim), student_temp, center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens, teacher_temp):
        self.apply_center_update()
        self.center = self.center.to(device=teacher_patch_tokens.device)
        return F.softmax((teacher_patch_tokens - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output, teacher_temp, n_masked_patches_tensor, n_iterations=3):
        """teacher_output: (n_masked_patches, K); n_masked_patches_tensor: this rank's count, summed over ranks.

        Unlike Meta's code, the caller's tensor is not modified in place and no process group is needed.
        """
        n_total = torch.as_tensor(n_masked_patches_tensor, device=teacher_output.device).clone()
        _all_reduce_(n_total)
        return sinkhorn_knopp(teacher_output, teacher_temp, n_total, n_iterations)

    def forward(self, student_patch_tokens, teacher_patch_tokens, student_masks_flat):
        """Dense variant: (B, N, K) tokens and (B, N) masks; mean over each image's masked patches, then images."""
        t = teacher_patch_tokens
        s = student_patch_tokens
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        loss = torch.sum(loss * student_masks_flat.float(), dim=-1) / student_masks_flat.sum(dim=-1).clamp(min=1.0)
        return -loss.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked,
        teacher_patch_tokens_masked,
        student_masks_flat,
        n_masked_patches=None,
        masks_weight=None,
    ):
        """Cross-entropy per masked patch, weighted by 1/(masked patches of its image), summed, divided by the
        number of images in `student_masks_flat` (masked or not)."""
        t = teacher_patch_tokens_masked
        s = student_patch_tokens_masked
        loss = torch.sum(t * F.log_softmax(s / self.student_temp, dim=-1), dim=-1)
        if masks_weight is None:
            masks_weight = (
                (1 / student_masks_flat.sum(-1).clamp(min=1.0))
                .unsqueeze(-1)
                .expand_as(student_masks_flat)[student_masks_flat]
            )
        if n_masked_patches is not None:
            loss = loss[:n_masked_patches]
        loss = loss * masks_weight
        return -loss.sum() / student_masks_flat.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens):
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens):
        self._start_center_update(torch.sum(teacher_patch_tokens.float().mean(1), dim=0, keepdim=True),
                                  len(teacher_patch_tokens))


def _apply_pending_center_update(module, prefix, keep_vars):
    module.apply_center_update()


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., 2018): spreads the features of a batch.

    Computed in float32 with autocast off. Undefined for a single sample (no nearest neighbour): raises ValueError.
    """

    def __init__(self):
        super().__init__()
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    def pairwise_NNs_inner(self, x):  # noqa: N802 - Meta's name
        """Index of each row's nearest neighbour among the other rows, for L2-normalised rows."""
        dots = torch.mm(x, x.t())
        n = x.shape[0]
        dots.view(-1)[:: (n + 1)].fill_(-1)  # exclude each vector itself
        _, indices = torch.max(dots, dim=1)
        return indices

    def forward(self, student_output, eps=1e-8):
        """student_output: (B, D) backbone features (B >= 2)."""
        if student_output.ndim != 2 or student_output.shape[0] < 2:
            raise ValueError(
                f"KoLeoLoss needs a (B, D) batch with B >= 2 (got shape {tuple(student_output.shape)}): the "
                "nearest neighbour of a single sample is undefined. Use at least 2 images per batch and per "
                "process, or set the KoLeo loss weight to 0."
            )
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            student_output = F.normalize(student_output.float(), eps=eps, p=2, dim=-1)
            indices = self.pairwise_NNs_inner(student_output)
            distances = self.pdist(student_output, student_output[indices])
            loss = -torch.log(distances + eps).mean()
        return loss


def multicrop_dino_loss(dino_loss: DINOLoss, student_global, student_local, teacher_global, n_local_crops):
    """DINO loss terms of one step with 2 global and n local crops, normalised as in Meta's ssl_meta_arch.

    student_global: (2B, K) logits, crop-major (all images' crop 0, then crop 1); student_local: (n·B, K) logits,
    crop-major, or None when n = 0; teacher_global: (2, B, K) or (2B, K) teacher targets (softmax-centred or
    Sinkhorn-Knopp) in crop order. Every local crop is matched to both teacher globals, each student global to
    the OTHER teacher global; both terms are divided by the number of terms, 2·n + 2 (Meta divides by 3, not 2,
    when n = 0). Returns Meta's loss_dict entries `dino_local_crops_loss` (when n > 0) and
    `dino_global_crops_loss`; their sum is the DINO loss.
    """
    teacher_global = teacher_global.reshape(2, -1, teacher_global.shape[-1])
    teacher_swapped = teacher_global.flip(0)  # teacher crop 1 is the target of student crop 0 and vice versa
    n_global_crops = 2
    n_local_terms = max(n_local_crops * n_global_crops, 1)
    n_global_terms = (n_global_crops - 1) * n_global_crops
    n_terms = n_local_terms + n_global_terms

    losses = {}
    if n_local_crops > 0:
        losses["dino_local_crops_loss"] = dino_loss(student_local.chunk(n_local_crops), teacher_swapped) / n_terms
    # dino_loss averages over the 2B global rows; x2 turns that into the sum of the two crop terms.
    losses["dino_global_crops_loss"] = dino_loss([student_global], [teacher_swapped.flatten(0, 1)]) * 2 / n_terms
    return losses
