"""The one registry of the loss family's variants: every axis a loss composes over, the cells that cover them
pairwise, how to build a cell's inputs, call the public API and compute its float64 reference.

A cell is one point of spec x teacher form x shape x backend x reduction x num_items_in_batch x head
post-processing x divergence. ``cells()`` covers every pair of axis values at least once (a greedy pairwise cover
of the full product, deterministic), so the matrix stays small enough for the suite's time budget while any two features
meet somewhere. ``run_cell`` returns the loss and the student gradients, ``reference_cell`` the float64 ones of
the same inputs; a cell whose combination is refused by design says so through ``documented_error`` and is
checked to raise exactly that.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple, Optional

import torch

import ttm_kernels
from ttm_kernels import reference

AXES = {
    "spec": ("wttm", "ttm", "kd"),
    "form": ("logits", "head", "topk", "head_topk"),
    "shape": ("2d", "3d", "sliced"),
    "backend": ("cpu", "triton", "torch"),
    # "mean_num_items": reduction "mean" over num_items_in_batch (gradient accumulation) instead of the count
    "reduction": ("mean", "mean_num_items", "sum", "none"),
    "post": ("plain", "softcap"),
    # jsd_beta: the forward KL, the generalised JSD, the reverse KL
    "divergence": ("kl", "jsd", "rkl"),
}
JSD_BETA = {"kl": 0.0, "jsd": 0.4, "rkl": 1.0}
HYPER = {"wttm": dict(gamma=0.3, beta=2.0, ce_weight=0.5), "ttm": dict(gamma=0.5, beta=3.0, ce_weight=0.7),
         "kd": dict(temperature=2.5, beta=0.9, ce_weight=0.1)}
POST = {"plain": {}, "softcap": dict(softcap=7.0, logit_scale=0.8)}
VOCAB, HIDDEN, TEACHER_HIDDEN, K, SPREAD = 37, 8, 11, 5, 12.0
LEAD = {"2d": (6,), "3d": (2, 3), "sliced": (2, 3)}
IGNORE = -100

PUBLIC = {
    ("logits", "wttm"): ttm_kernels.fused_wttm_loss, ("logits", "ttm"): ttm_kernels.fused_ttm_loss,
    ("logits", "kd"): ttm_kernels.fused_kd_loss,
    ("head", "wttm"): ttm_kernels.fused_linear_wttm_loss, ("head", "ttm"): ttm_kernels.fused_linear_ttm_loss,
    ("head", "kd"): ttm_kernels.fused_linear_kd_loss,
    ("topk", "wttm"): ttm_kernels.fused_wttm_loss_topk, ("topk", "ttm"): ttm_kernels.fused_ttm_loss_topk,
    ("topk", "kd"): ttm_kernels.fused_kd_loss_topk,
    ("head_topk", "wttm"): ttm_kernels.fused_linear_wttm_loss_topk,
    ("head_topk", "ttm"): ttm_kernels.fused_linear_ttm_loss_topk,
    ("head_topk", "kd"): ttm_kernels.fused_linear_kd_loss_topk,
}


class Cell(NamedTuple):
    spec: str
    form: str
    shape: str
    backend: str
    reduction: str
    post: str
    divergence: str = "kl"

    @property
    def id(self) -> str:
        return "-".join(self)

    @property
    def num_items(self) -> bool:
        return self.reduction == "mean_num_items"

    @property
    def torch_reduction(self) -> str:
        return "mean" if self.num_items else self.reduction


# Vocabulary parallelism (``process_group``): each rank's columns, uneven; with 3 ranks the middle one holds one.
COLUMNS = {2: (0, 20, VOCAB), 3: (0, 20, 21, VOCAB)}
# The axes of the process_group cells, which run in gloo spawns (test_distributed.py): every teacher form on the
# CPU, every spec, reduction and head post-processing; then the reference backend (refused by the dense forms).
DISTRIBUTED_AXES = dict(AXES, shape=("3d", "sliced"), backend=("cpu",))


def distributed_cells() -> list[Cell]:
    """The process_group cells: a pairwise cover of ``DISTRIBUTED_AXES``, and the reference backend."""
    # The top-k forms take the reference backend (the reference's arithmetic per rank); the dense forms refuse it.
    reference_backend = [Cell("wttm", "topk", "sliced", "torch", "none", "softcap"),
                         Cell("kd", "head_topk", "sliced", "torch", "sum", "softcap"),
                         Cell("ttm", "logits", "3d", "torch", "mean", "plain")]
    return cells(DISTRIBUTED_AXES) + reference_backend


def cells(axes: dict = AXES) -> list[Cell]:
    """A greedy pairwise cover of ``axes``: each step takes the combination that covers most pairs not yet
    covered (ties: the first in product order), until every pair of values of two axes is covered."""
    names = list(axes)
    uncovered = {((i, a), (j, b)) for i, j in itertools.combinations(range(len(names)), 2)
                 for a in axes[names[i]] for b in axes[names[j]]}
    product = list(itertools.product(*axes.values()))
    chosen = []
    while uncovered:
        def gain(combo):
            return sum(((i, combo[i]), (j, combo[j])) in uncovered
                       for i, j in itertools.combinations(range(len(names)), 2))
        best = max(product, key=gain)
        uncovered -= {((i, best[i]), (j, best[j])) for i, j in itertools.combinations(range(len(names)), 2)}
        chosen.append(Cell(*best))
    return chosen


def documented_error(cell: Cell, distributed: bool = False) -> Optional[tuple[type, str]]:
    """The error a cell must raise (with ``process_group`` when ``distributed``), when its combination is refused;
    else None."""
    if distributed and cell.backend == "torch" and cell.form in ("logits", "head"):
        return ValueError, "the vocabulary-parallel loss runs on the compiled kernels"
    if cell.form in ("topk", "head_topk") and cell.backend != "torch" and cell.divergence != "kl":
        return ValueError, "the top-k kernels compute the forward KL only"
    return None


def shard(inputs: dict, columns: tuple) -> dict:
    """A rank's inputs: its vocabulary columns of the logits, its rows of the LM heads; the rest whole."""
    a, b = columns
    out = dict(inputs)
    for name in ("student_logits", "teacher_logits"):
        if name in out:
            out[name] = out[name][..., a:b]
    for name in ("student_weight", "student_bias", "teacher_weight"):
        if name in out:
            out[name] = out[name][a:b]
    return out


def grad_shard(name: str, grad: torch.Tensor, columns: tuple) -> torch.Tensor:
    """A rank's part of the whole gradient of ``name`` (the hidden states' gradient is summed over the ranks)."""
    a, b = columns
    if name == "student_logits":
        return grad[..., a:b]
    return grad[a:b] if name in ("student_weight", "student_bias") else grad


def device_of(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _lead_slice(x: torch.Tensor, shape: str) -> torch.Tensor:
    """(2, 4, ...) -> the (2, 3, ...) slice ``x[:, :-1]`` (read in place by the kernels), or a contiguous
    tensor of the shape's leading dimensions."""
    if shape == "sliced":
        return x[:, :-1]
    return x[:, :-1].reshape(*LEAD[shape], *x.shape[2:]).contiguous()


def make_inputs(cell: Cell, seed: int) -> dict:
    """float64 inputs of the cell's teacher form with realistic spread, on the cell's backend's device; the
    leading shape (2, 4) is sliced or reshaped per ``cell.shape``. Some rows ignored, one top-k row padded."""
    gen = torch.Generator().manual_seed(seed)
    base = (2, 4)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    inputs = {}
    if cell.form in ("logits", "topk"):
        inputs["student_logits"] = randn(*base, VOCAB, scale=SPREAD)
    else:
        inputs["student_hidden"] = randn(*base, HIDDEN)
        inputs["student_weight"] = randn(VOCAB, HIDDEN, scale=SPREAD / HIDDEN**0.5)
        inputs["student_bias"] = randn(VOCAB)
    teacher_logits = randn(*base, VOCAB, scale=SPREAD)
    if cell.form == "logits":
        inputs["teacher_logits"] = teacher_logits
    elif cell.form == "head":
        inputs["teacher_hidden"] = randn(*base, TEACHER_HIDDEN)
        inputs["teacher_weight"] = randn(VOCAB, TEACHER_HIDDEN, scale=SPREAD / TEACHER_HIDDEN**0.5)
    else:
        top = torch.log_softmax(teacher_logits, -1).topk(K, dim=-1)
        order = torch.argsort(torch.rand(*base, K, generator=gen), dim=-1)
        ids, logprobs = top.indices.gather(-1, order), top.values.gather(-1, order)
        ids[0, 1, 2:] = -1  # a row with fewer ids
        inputs["teacher_topk_ids"], inputs["teacher_topk_logprobs"] = ids, logprobs
    target = torch.randint(0, VOCAB, base, generator=gen)
    target[0, 0] = target[1, 2] = IGNORE
    inputs["target"] = target
    device = device_of(cell.backend)
    return {name: _lead_slice(x, cell.shape).to(device) if x.dim() > 2 or name == "target"
            else x.to(device) for name, x in inputs.items()}


def num_items(cell: Cell, inputs: dict):
    """The count a cell passes as ``num_items_in_batch``: more rows than this call's (other micro-batches)."""
    if not cell.num_items:
        return None
    return int((inputs["target"] != IGNORE).sum()) + 3


STUDENT_NAMES = ("student_logits", "student_hidden", "student_weight", "student_bias")


def run_cell(cell: Cell, inputs: dict, upstream=None, **overrides):
    """The public entry point of the cell on float32 copies of ``inputs``: (loss, {name: gradient});
    ``overrides``: keyword arguments replacing the cell's own."""
    args = {}
    for name, x in inputs.items():
        if x.is_floating_point():
            x = x.float()
            if name in STUDENT_NAMES:
                x = x.detach().clone().requires_grad_()
        args[name] = x
    fn = PUBLIC[(cell.form, cell.spec)]
    kwargs = dict(HYPER[cell.spec], reduction=cell.torch_reduction, backend=cell.backend, **POST[cell.post],
                  jsd_beta=JSD_BETA[cell.divergence])
    if cell.num_items:
        kwargs["num_items_in_batch"] = num_items(cell, inputs)
    kwargs.update(overrides)
    if cell.form in ("logits", "topk"):
        teacher = ((args["teacher_logits"],) if cell.form == "logits"
                   else (args["teacher_topk_ids"], args["teacher_topk_logprobs"]))
        loss = fn(args["student_logits"], *teacher, args["target"], **kwargs)
    else:
        teacher = ((args["teacher_hidden"], args["teacher_weight"]) if cell.form == "head"
                   else (args["teacher_topk_ids"], args["teacher_topk_logprobs"]))
        loss = fn(args["student_hidden"], args["student_weight"], *teacher, args["target"],
                  student_bias=args["student_bias"], **kwargs)
    loss.backward(upstream)
    return loss.detach(), {name: args[name].grad for name in STUDENT_NAMES if name in args}


def head_post(logits: torch.Tensor, post: str) -> torch.Tensor:
    """The heads' post-processing, written out: ``softcap * tanh(logit_scale * x / softcap)``."""
    if post == "plain":
        return logits
    p = POST[post]
    return p["softcap"] * torch.tanh(logits * p["logit_scale"] / p["softcap"])


def reference_params(spec: str, divergence: str = "kl") -> dict:
    h = HYPER[spec]
    if spec == "kd":
        t = h["temperature"]
        scales = dict(student_scale=1 / t, teacher_scale=1 / t, kl_scale=t * t, weighted=False)
    else:
        scales = dict(teacher_scale=h["gamma"], weighted=spec == "wttm")
    return dict(scales, beta=h["beta"], ce_weight=h["ce_weight"], ignore_index=IGNORE,
                jsd_beta=JSD_BETA[divergence])


def reference_cell(cell: Cell, inputs: dict, upstream=None, **overrides):
    """The float64 reference of the cell on the float32-rounded inputs (the comparison is of the arithmetic):
    (loss, {name: gradient}); ``overrides``: keyword arguments of the reference's row loss replacing the cell's."""
    leaves = {name: x.detach().float().double().requires_grad_() for name, x in inputs.items()
              if name in STUDENT_NAMES}
    if cell.form in ("logits", "topk"):
        z = leaves["student_logits"]
    else:
        z = leaves["student_hidden"] @ leaves["student_weight"].T + leaves["student_bias"]
    z = head_post(z, cell.post)
    target = inputs["target"]
    params = dict(reference_params(cell.spec, cell.divergence), **overrides)
    if cell.form == "logits":
        v = head_post(inputs["teacher_logits"].float().double(), cell.post)
        rows = reference.loss_rows(z, v, target, **params)
    elif cell.form == "head":
        v = inputs["teacher_hidden"].float().double() @ inputs["teacher_weight"].float().double().T
        rows = reference.loss_rows(z, head_post(v, cell.post), target, **params)
    else:
        rows = reference.topk_loss_rows(z, inputs["teacher_topk_ids"],
                                        inputs["teacher_topk_logprobs"].float().double(), target, **params)
    if cell.reduction == "none":
        loss = rows["loss"]
    elif cell.reduction == "sum":
        loss = rows["loss"].sum()
    else:
        loss = rows["loss"].sum() / (num_items(cell, inputs) or max(int(rows["valid"].sum()), 1))
    loss.backward(None if upstream is None else upstream.double())
    return loss.detach(), {name: x.grad for name, x in leaves.items()}


def assert_close(name, ref, out, rtol, atol=0.0):
    """Max abs error relative to the reference's largest magnitude, with the shape and NaN/inf parity."""
    ref, out = ref.double().cpu(), out.double().cpu()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.equal(torch.isnan(ref), torch.isnan(out)), f"{name}: NaN pattern differs"
    assert torch.equal(torch.isinf(ref), torch.isinf(out)), f"{name}: inf pattern differs"
    finite = torch.isfinite(ref)
    if finite.any():
        err = (ref[finite] - out[finite]).abs().max().item()
        scale = ref[finite].abs().max().item()
        assert err <= rtol * scale + atol, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g} + {atol:g}"


# Head forms run GEMMs in float32 before the loss: their tolerance is the fused linear tests' own.
RTOL = {"logits": (1e-5, 1e-4), "topk": (1e-5, 1e-4), "head": (2e-4, 2e-4), "head_topk": (2e-4, 2e-4)}


def upstream(cell: Cell) -> Optional[torch.Tensor]:
    """The upstream gradient of a "none" cell's per-row losses (not all ones); None for a scalar loss."""
    if cell.reduction != "none":
        return None
    return torch.linspace(0.5, 2.0, 6, dtype=torch.float32).view(LEAD[cell.shape]).to(device_of(cell.backend))


def assert_matches(cell: Cell, loss, grads, ref_loss, ref_grads, columns=None):
    """The cell's float32 loss and gradients (a rank's part of them, for ``columns``) against the reference's."""
    loss_rtol, grad_rtol = RTOL[cell.form]
    assert_close("loss", ref_loss, loss, loss_rtol, 1e-6)
    assert loss.dtype == torch.float32
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        if columns is not None:
            ref = grad_shard(name, ref, columns)
        assert_close(f"d loss / d {name}", ref, grads[name], grad_rtol, 1e-7)
