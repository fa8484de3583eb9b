"""The sparse-teacher (top-k) losses on the dense loss's ops (``_ops``, teacher forms "topk_bucket" and
"topk_renormalize"): the same argument normalisation, the same two autograd paths, the same first-order contract.

Every compiled backend module (``triton_topk``, ``cpu_kernels``) offers, on normalised arguments ((B, T, V)
row views of the student, ``topk_rows``' sorted int32 ids and fp32 log-probabilities, ``_ops``' target and
upstream gradient):

    topk_forward(student, ids, logprobs, target, *, student_scale, teacher_scale, kl_coef, ce_weight, weighted,
                 bucket, ignore_index, grad=None, row_grad=None) -> stats (NUM_STATS, N) fp32 (``TopkStat``)
    topk_backward(row_grad, student, ids, logprobs, target, stats, grad, *, ..., col_offset=0, vocab=None) -> None
    topk_partial(student, ids, target, *, student_scale, bucket, ignore_index, col_offset, vocab)
        -> sums (NUM_TOPK_PARTIAL, N) fp32 (``TopkPartial``) of a piece of the rows: columns [col_offset,
           col_offset + V) of rows of ``vocab`` columns

No (N, V) tensor is allocated besides the gradient (none when it is written into the logits' storage). Rows held
in pieces (the vocabulary shards of ranks) take ``TopkPieces``: each piece's ``topk_partial``, the merge, and
each piece's ``topk_backward``.
"""
from __future__ import annotations

import torch

from . import _ops, reference
from ._rows import row_view
from ._stats import NUM_STATS, NUM_TOPK_PARTIAL, TopkPartial, TopkStat


def topk_rows(ids: torch.Tensor, logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's ids as the kernels take them, a contiguous int32 (N, k) sorted ascending per row (the
    padding id -1 first), and its log-probabilities in the same order, a contiguous fp32 (N, k). Sorted once
    per call (O(N k log k)): the statistics pass then finds the ids of each block of columns by walking them."""
    k = ids.shape[-1]
    sorted_ids, order = torch.sort(ids.reshape(-1, k).to(torch.int32), dim=-1)
    return sorted_ids.contiguous(), logprobs.reshape(-1, k).float().gather(-1, order).contiguous()


class TopkPieces:
    """``_ops.RowPieces`` for a top-k teacher (the teacher as ``[ids, logprobs]``, ``topk_rows``' sorted ids): the
    loss of rows whose columns are held in pieces (the vocabulary shards of ranks), on ``backend``'s kernels.

    ``partial``: a piece's online sums over its columns outside S (the kernels' ``topk_partial``, one read of the
    piece), with the logits of S and of the target that the piece holds (-inf for the others); ``merge``: the
    rows' statistics (``TopkStat``) from every piece's, and the O(k) terms of the loss (the teacher, the KL over
    S + {R}, the CE, the entropy) in float64 on (N, k) tensors, with the reference's teacher and divergence;
    ``second_pass``: a piece's gradient from the merged statistics (the kernels' ``topk_backward``). The loss
    needs no second pass over the columns (``has_piece_sums`` False: no sums to reduce, nothing to finish)."""

    gradient_needs_sums = False  # the kernels' top-k divergence is the forward KL (see topk._topk_backend)
    has_piece_sums = False

    def __init__(self, backend: str, scales, weighted: bool, ignore_index: int, tail: str, vocab: int):
        self.kernels = _ops._topk_kernels(backend)
        self.student_scale, self.teacher_scale, self.kl_coef, self.ce_weight, jsd_beta = scales
        if jsd_beta != 0.0:
            raise ValueError(f"the top-k kernels compute the forward KL only, got jsd_beta={jsd_beta}")
        self.weighted, self.ignore_index, self.tail, self.vocab = weighted, ignore_index, tail, vocab

    def _params(self) -> dict:
        return dict(student_scale=self.student_scale, bucket=self.tail == "bucket", ignore_index=self.ignore_index,
                    vocab=self.vocab)

    def partial(self, student, teacher, target, col_offset: int, chunk_v=None) -> torch.Tensor:
        """(NUM_TOPK_PARTIAL + 1 + k, N) fp32: the piece's ``TopkPartial`` sums, its logit of each row's target
        and its logits of the k ids (the k ids in their sorted order), -inf where another piece holds them."""
        ids, _ = teacher
        view, target = row_view(student), _ops._target_rows(target)
        sums = self.kernels.topk_partial(view, ids, target, col_offset=col_offset, **self._params())
        width, k = view.shape[-1], ids.shape[-1]
        columns = torch.cat([ids, ids.new_full((ids.shape[0], 1), -1) if target is None else
                             target.view(-1, 1).to(ids.dtype)], -1).long() - col_offset
        here = (columns >= 0) & (columns < width)
        held = view.gather(-1, torch.where(here, columns, 0).view(*view.shape[:-1], k + 1)).view(-1, k + 1)
        held = held.float().masked_fill(~here, float("-inf"))
        return torch.cat([sums, held[:, k:].T, held[:, :k].T])

    def merge(self, partials, teacher, target) -> torch.Tensor:
        """The rows' statistics (NUM_STATS, N) fp32 (``TopkStat``) from every piece's ``partial`` concatenated on
        the last dimension (NUM_TOPK_PARTIAL + 1 + k, N, C), in any order."""
        ids, logprobs = teacher
        n = ids.shape[0]
        valid = (torch.ones(n, dtype=torch.bool, device=ids.device) if target is None
                 else target.reshape(-1) != self.ignore_index)
        sums = partials[:NUM_TOPK_PARTIAL].double()
        tail_max, tail_sum, tail_entropy = _merged(sums[TopkPartial.MAX_S], sums[TopkPartial.SUM_S],
                                                   sums[TopkPartial.TAIL_ENTROPY])
        held = partials[NUM_TOPK_PARTIAL:].amax(-1)  # each logit from the one piece that holds it
        present = ids >= 0
        z_s = held[1:].T
        scaled_s = (z_s * self.student_scale).double()  # s*z in fp32, as the whole-row kernels form it
        max_all, log_sum_all = _with_values(tail_max, tail_sum, scaled_s, present)
        max_z, log_sum_z = max_all, log_sum_all
        if target is not None and self.student_scale != 1.0:  # the CE's lse(z), apart from lse(s*z)
            tail_z = _merged(sums[TopkPartial.MAX_Z], sums[TopkPartial.SUM_Z])[:2]
            max_z, log_sum_z = _with_values(*tail_z, z_s.double(), present)
        ce = (max_z - held[0].double()) + log_sum_z if target is not None else torch.zeros_like(max_all)

        # The student and the teacher on the k + 1 outcomes S + {R}; their KL and the student's entropy.
        log_q_tail = (tail_max - max_all) + torch.log(tail_sum) - log_sum_all
        log_q = torch.cat([(scaled_s - max_all[:, None]) - log_sum_all[:, None], log_q_tail[:, None]],
                          -1)  # -inf in the padding's slots, whose logits no piece holds
        _, _, log_pt, weight = reference.topk_teacher(ids, logprobs, valid, self.vocab, torch.float64,
                                                      teacher_scale=self.teacher_scale, weighted=self.weighted,
                                                      tail=self.tail)
        kl = reference.divergence(log_pt, log_q)
        entropy = reference.entropy(log_q if self.tail == "bucket" else log_q[:, :-1])
        if self.tail != "bucket":  # R's share of the student's entropy over the vocabulary: e^c (w - c d_R)
            c = (tail_max - max_all) - log_sum_all
            entropy = entropy + torch.where(tail_sum > 0, torch.exp(c) * (tail_entropy - c * tail_sum), 0)

        stats = torch.zeros((NUM_STATS, n), dtype=torch.float64, device=ids.device)
        rows = {TopkStat.KL: kl, TopkStat.CE: ce, TopkStat.WEIGHT: weight, TopkStat.ENTROPY: entropy,
                TopkStat.MAX_S: max_all, TopkStat.LOG_SUM_S: log_sum_all, TopkStat.MAX_R: tail_max,
                TopkStat.LOG_SUM_R: torch.log(tail_sum), TopkStat.MAX_Z: max_z, TopkStat.LOG_SUM_Z: log_sum_z}
        for row, value in rows.items():
            stats[row] = torch.where(valid, value, 0)
        stats[TopkStat.LOSS] = self.kl_coef * stats[TopkStat.WEIGHT] * stats[TopkStat.KL]
        if target is not None:
            stats[TopkStat.LOSS] += self.ce_weight * stats[TopkStat.CE]
        return stats.float()

    def second_pass(self, student, teacher, target, stats, col_offset: int, grad=None, row_grad=None):
        """With ``grad``: the piece's gradient of sum_i row_grad_i * loss_i, written into it. No sums."""
        if grad is None:
            return None
        ids, logprobs = teacher
        self.kernels.topk_backward(
            _ops._row_grad_rows(row_grad), row_view(student), ids, logprobs, _ops._target_rows(target),
            stats.contiguous(), _ops._own_rows(grad, "the gradient"), student_scale=self.student_scale,
            teacher_scale=self.teacher_scale, kl_coef=self.kl_coef, ce_weight=self.ce_weight,
            bucket=self.tail == "bucket", ignore_index=self.ignore_index, jsd_beta=0.0, col_offset=col_offset,
            vocab=self.vocab)
        return None


def _merged(maxima, sums, entropy=None):
    """The online (max, sum) pairs of the pieces (..., C), merged: sums by sum_c d_c exp(m_c - M); with
    ``entropy`` (the pieces' w_c = sum e_j (m_c - x_j)) also the merged w = sum_c e^(m_c - M) (w_c + (M - m_c) d_c)."""
    top = maxima.amax(-1, keepdim=True)  # finite: an empty piece holds the kernels' -1e30
    rescale = torch.exp(maxima - top)
    total = (sums * rescale).sum(-1)
    merged_entropy = None if entropy is None else (rescale * (entropy + (top - maxima) * sums)).sum(-1)
    return top.squeeze(-1), total, merged_entropy


def _with_values(tail_max, tail_sum, values, present):
    """The (max, log-sum) of a row from its tail's online pair and the values of S (where ``present``)."""
    values = values.masked_fill(~present, float("-inf"))
    top = torch.maximum(tail_max, values.amax(-1))
    total = tail_sum * torch.exp(tail_max - top) + torch.exp(values - top[:, None]).sum(-1)
    return top, torch.log(total)
