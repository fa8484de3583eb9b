"""fused_linear_{wttm,ttm,kd}_loss against the float64 reference on materialised logits.

Every case checks the loss and the gradients of the student's hidden states, weight and bias. The Triton
backend runs in the interpreter on CPU tensors without a GPU (conftest sets TRITON_INTERPRET=1), so the
shapes stay small; chunk sizes are explicit so that several chunks (and a ragged last one) are exercised.
"""
import pytest
import torch

import ttm_kernels
from ttm_kernels import (LinearKDLoss, LinearTTMLoss, LinearWTTMLoss, fused_linear_kd_loss, fused_linear_ttm_loss,
                         fused_linear_wttm_loss, reference)
from ttm_kernels import linear
from ttm_kernels.linear import default_chunk_size

BACKENDS = [
    pytest.param("triton", marks=pytest.mark.skipif(not ttm_kernels.triton_available(), reason="triton not installed")),
    pytest.param("cpu", marks=pytest.mark.skipif(not ttm_kernels.cpu_extension_available(),
                                                 reason="C++ extension ttm_kernels._C not built")),
    "torch",
]
FUSED = {"wttm": fused_linear_wttm_loss, "ttm": fused_linear_ttm_loss, "kd": fused_linear_kd_loss}
REFERENCE = {"wttm": reference.wttm_loss, "ttm": reference.ttm_loss, "kd": reference.kd_loss}
HYPER = {"wttm": {"gamma": 0.2}, "ttm": {"gamma": 0.5}, "kd": {"temperature": 2.0}}


def device_of(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def make_problem(n=23, hidden=16, vocab=70, teacher_vocab=None, spread=10.0, seed=0, bias=True, lead=None,
                 ignore_fraction=0.25, ignore_index=-100, with_target=True):
    """float64 inputs whose logits have standard deviation about ``spread``."""
    gen = torch.Generator().manual_seed(seed)
    teacher_vocab = teacher_vocab or vocab
    lead = lead or (n,)
    p = {
        "student_hidden": torch.randn(*lead, hidden, generator=gen, dtype=torch.float64),
        "student_weight": torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * spread / hidden**0.5,
        "teacher_hidden": torch.randn(*lead, hidden + 3, generator=gen, dtype=torch.float64),
        "teacher_weight": torch.randn(teacher_vocab, hidden + 3, generator=gen, dtype=torch.float64)
        * spread / (hidden + 3)**0.5,
        "student_bias": torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None,
        "teacher_bias": torch.randn(teacher_vocab, generator=gen, dtype=torch.float64) if bias else None,
        "target": None,
    }
    if with_target:
        target = torch.randint(0, vocab, lead, generator=gen)
        target[torch.rand(lead, generator=gen) < ignore_fraction] = ignore_index
        p["target"] = target
    return p


STUDENT = ("student_hidden", "student_weight", "student_bias")


def head(logits, softcap=None, logit_scale=1.0):
    """What the models' heads do to their logits (Cohere's scale, Gemma-2's soft-cap), written out."""
    logits = logits * logit_scale
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def reference_loss_and_grads(kind, p, reduction="mean", upstream=None, ignore_index=-100, softcap=None,
                             logit_scale=1.0, teacher_softcap="student", teacher_logit_scale="student", **kw):
    """float64: materialise both logits (teacher aligned to the student's vocabulary as documented); the teacher's
    head post-processes as the student's unless ``teacher_softcap`` / ``teacher_logit_scale`` are given."""
    teacher_softcap = softcap if teacher_softcap == "student" else teacher_softcap
    teacher_logit_scale = logit_scale if teacher_logit_scale == "student" else teacher_logit_scale
    leaves = {k: p[k].detach().double().requires_grad_() for k in STUDENT if p[k] is not None}
    z = leaves["student_hidden"] @ leaves["student_weight"].T
    if "student_bias" in leaves:
        z = z + leaves["student_bias"]
    v = p["teacher_hidden"].double() @ p["teacher_weight"].double().T
    if p["teacher_bias"] is not None:
        v = v + p["teacher_bias"].double()
    z, v = head(z, softcap, logit_scale), head(v, teacher_softcap, teacher_logit_scale)
    vocab = z.shape[-1]
    if v.shape[-1] >= vocab:
        v = v[..., :vocab]
    else:
        v = torch.cat([v, v.new_full((*v.shape[:-1], vocab - v.shape[-1]), float("-inf"))], -1)
    loss = REFERENCE[kind](z, v, p["target"], reduction=reduction, ignore_index=ignore_index, **HYPER[kind], **kw)
    loss.backward(None if upstream is None else upstream.double())
    return loss.detach(), {k: x.grad for k, x in leaves.items()}


def fused_loss_and_grads(kind, p, backend, dtype=torch.float32, reduction="mean", upstream=None, **kw):
    device = device_of(backend)
    args = {k: None if x is None else x.to(device) for k, x in p.items()}
    for k, x in args.items():
        if x is not None and x.is_floating_point():
            args[k] = x.to(dtype).requires_grad_(k in STUDENT)
    loss = FUSED[kind](args["student_hidden"], args["student_weight"], args["teacher_hidden"], args["teacher_weight"],
                       args["target"], student_bias=args["student_bias"], teacher_bias=args["teacher_bias"],
                       reduction=reduction, backend=backend, **HYPER[kind], **kw)
    loss.backward(None if upstream is None else upstream.to(device))
    return loss.detach(), {k: args[k].grad for k in STUDENT if args[k] is not None}


def assert_close(name, ref, out, rtol=2e-4):
    """Max abs error relative to the reference's largest magnitude, plus NaN/inf parity."""
    ref, out = ref.double().cpu(), out.double().cpu()
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.equal(torch.isfinite(ref), torch.isfinite(out)), f"{name}: non-finite pattern differs"
    err = (ref - out).abs().max().item() if ref.numel() else 0.0
    scale = ref.abs().max().item() if ref.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{name}: max error {err:.3g} > {rtol:g} * {scale:.3g}"


def check_against_reference(kind, p, backend, reduction="mean", upstream=None, **kw):
    ref_loss, ref_grads = reference_loss_and_grads(
        kind, p, reduction, upstream, ignore_index=kw.get("ignore_index", -100),
        **{k: kw[k] for k in ("beta", "ce_weight", "softcap", "logit_scale", "teacher_softcap", "teacher_logit_scale")
           if k in kw})
    loss, grads = fused_loss_and_grads(kind, p, backend, reduction=reduction, upstream=upstream, **kw)
    assert loss.dtype == torch.float32
    assert_close("loss", ref_loss, loss)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert grads[k].dtype == torch.float32
        assert_close(f"d {k}", ref_grads[k], grads[k])


# (name, problem kwargs, loss kwargs, upstream gradient): chunk sizes that do not divide N, equal it, exceed it
# and the default; all reductions; ignored rows with -100 and with a valid class id; a 3-D batch; no target.
CASES = [
    ("mean-chunk5-spread10", {}, {"chunk_size": 5}, None),
    ("sum-chunkN-spread30", {"spread": 30.0, "seed": 1}, {"reduction": "sum", "chunk_size": 23, "beta": 3.0}, None),
    ("none-chunk64-spread1", {"spread": 1.0, "seed": 2}, {"reduction": "none", "chunk_size": 64, "ce_weight": 0.5},
     "randn"),
    ("none-chunk7-3d", {"lead": (3, 7), "seed": 3}, {"reduction": "none", "chunk_size": 7}, "randn"),
    ("mean-default-upstream2.5-ignore3-nobias", {"bias": False, "ignore_index": 3, "seed": 4},
     {"ignore_index": 3}, 2.5),
    ("mean-chunk4-notarget", {"with_target": False, "seed": 5, "spread": 20.0}, {"chunk_size": 4}, None),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(backend, kind, case):
    _, problem_kw, loss_kw, upstream = case
    p = make_problem(**problem_kw)
    loss_kw = dict(loss_kw)
    reduction = loss_kw.pop("reduction", "mean")
    if upstream == "randn":
        lead = p["student_hidden"].shape[:-1]
        upstream = torch.randn(lead, generator=torch.Generator().manual_seed(7))
    elif upstream is not None:
        upstream = torch.tensor(float(upstream))
    check_against_reference(kind, p, backend, reduction=reduction, upstream=upstream, **loss_kw)


# The heads' own post-processing of their logits; with spread-10 logits the soft-caps bind hard.
HEADS = [("softcap5", {"softcap": 5.0}), ("logit-scale0.3", {"logit_scale": 0.3}),
         ("logit-scale2.5-softcap8", {"logit_scale": 2.5, "softcap": 8.0})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "ttm", "kd"])
@pytest.mark.parametrize("head_kw", [h for _, h in HEADS], ids=[name for name, _ in HEADS])
def test_fused_linear_loss_softcap_and_logit_scale(backend, kind, head_kw):
    """softcap and logit_scale reach both models' logits, with their gradient; the teacher's -inf columns
    (a smaller teacher vocabulary) stay -inf rather than becoming -softcap."""
    p = make_problem(vocab=70, teacher_vocab=66, seed=31)
    check_against_reference(kind, p, backend, chunk_size=6, vocab_mismatch="truncate_teacher", **head_kw)


# Teacher heads of their own (TRL's separate softcaps and logit scales: a teacher of another model family).
TEACHER_HEADS = [("teacher-softcap6-only", {"teacher_softcap": 6.0}),
                 ("softcap5-teacher-none-scale0.4", {"softcap": 5.0, "teacher_softcap": None,
                                                     "teacher_logit_scale": 0.4}),
                 ("both-differ", {"softcap": 5.0, "logit_scale": 2.0, "teacher_softcap": 8.0,
                                  "teacher_logit_scale": 0.7})]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "kd"])
@pytest.mark.parametrize("head_kw", [h for _, h in TEACHER_HEADS], ids=[name for name, _ in TEACHER_HEADS])
def test_fused_linear_loss_teacher_softcap_and_logit_scale(backend, kind, head_kw):
    """teacher_softcap and teacher_logit_scale post-process the teacher's logits, softcap and logit_scale the
    student's (with its gradient), each head its own way."""
    p = make_problem(vocab=70, teacher_vocab=66, seed=34)
    check_against_reference(kind, p, backend, chunk_size=6, vocab_mismatch="truncate_teacher", **head_kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_wttm_loss_softcap_reduction_none(backend):
    """The recomputing backward of reduction="none" applies the same chain rule."""
    p = make_problem(lead=(3, 5), seed=32)
    upstream = torch.randn((3, 5), generator=torch.Generator().manual_seed(3))
    check_against_reference("wttm", p, backend, reduction="none", upstream=upstream, chunk_size=4, softcap=4.0,
                            logit_scale=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_fused_linear_loss_num_items_in_batch_accumulates_to_the_full_batch(backend, kind):
    """4 micro-batches of uneven padding (one all padding), each divided by the labelled rows of all four
    (a tensor, as Hugging Face passes it, or a number), sum to the full batch's loss and gradients."""
    p = make_problem(n=32, seed=33, ignore_fraction=0.0)
    target = p["target"].clone()
    for batch, pad in enumerate((0, 3, 6, 8)):
        target[batch * 8 + 8 - pad: batch * 8 + 8] = -100
    p["target"] = target
    full_loss, full_grads = fused_loss_and_grads(kind, p, backend, chunk_size=5)
    count = (target != -100).sum()
    args = {k: None if x is None else x.to(device_of(backend)) for k, x in p.items()}
    leaves = {k: args[k].float().requires_grad_() for k in STUDENT}
    total = 0.0
    for batch, num_items in enumerate((count, int(count), float(count), count.float())):
        rows = slice(batch * 8, batch * 8 + 8)
        loss = FUSED[kind](leaves["student_hidden"][rows], leaves["student_weight"], args["teacher_hidden"][rows].float(),
                           args["teacher_weight"].float(), args["target"][rows], student_bias=leaves["student_bias"],
                           teacher_bias=args["teacher_bias"].float(), backend=backend, chunk_size=5,
                           num_items_in_batch=num_items, **HYPER[kind])
        loss.backward()
        total += loss.item()
    assert_close("loss", full_loss, torch.tensor(total), rtol=2e-6)
    for k in STUDENT:
        assert_close(f"d {k}", full_grads[k], leaves[k].grad, rtol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "kd"])
@pytest.mark.parametrize("teacher_vocab", [75, 66], ids=["teacher-larger-truncated", "student-padding"])
def test_vocab_mismatch(backend, kind, teacher_vocab):
    p = make_problem(vocab=70, teacher_vocab=teacher_vocab, seed=11)
    check_against_reference(kind, p, backend, chunk_size=9, vocab_mismatch="truncate_teacher")


def test_student_padding_is_minus_inf_not_zero():
    """Padding the teacher with zero logits would give tokens it lacks probability mass."""
    p = make_problem(vocab=70, teacher_vocab=66, seed=12)
    loss, _ = fused_loss_and_grads("wttm", p, "torch", vocab_mismatch="truncate_teacher")
    zero_pad = dict(p, teacher_weight=torch.cat([p["teacher_weight"], p["teacher_weight"].new_zeros(4, 19)]),
                    teacher_bias=torch.cat([p["teacher_bias"], p["teacher_bias"].new_zeros(4)]))
    ref_zero, _ = reference_loss_and_grads("wttm", zero_pad)
    ref_inf, _ = reference_loss_and_grads("wttm", p)
    assert_close("loss", ref_inf, loss)
    assert abs(ref_zero.item() - loss.item()) > 1e-3 * abs(loss.item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_and_empty(backend):
    p = make_problem(n=6, ignore_fraction=1.0, seed=13)
    for reduction in ("mean", "sum"):
        loss, grads = fused_loss_and_grads("wttm", p, backend, reduction=reduction, chunk_size=4)
        assert loss.item() == 0.0
        assert all(bool((g == 0).all()) for g in grads.values())
    empty = make_problem(n=0, seed=14)
    loss, grads = fused_loss_and_grads("wttm", empty, backend)
    assert loss.item() == 0.0 and grads["student_hidden"].shape == (0, 16)
    assert bool((grads["student_weight"] == 0).all())


def _flops_and_grads(kind, p, backend, reduction, upstream):
    """The matrix-multiply FLOPs of a forward and backward (torch's FlopCounterMode counts every mm/addmm), the
    loss and the gradients."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        loss, grads = fused_loss_and_grads(kind, p, backend, reduction=reduction, upstream=upstream, chunk_size=3)
    return counter.get_total_flops(), loss, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_loss_ignored_rows_never_reach_a_gemm(backend, reduction):
    """Three rows in four ignored: the GEMMs (student's, teacher's, both of the backward, also the backward's
    recomputation for "none") run on the counted rows only, exactly as for a call given just those rows, with
    the same loss and gradients, and a zero hidden-state gradient on the ignored rows."""
    p = make_problem(n=24, ignore_fraction=0.75, seed=21)
    kept = (p["target"] != -100).nonzero().squeeze(1)
    assert 0 < kept.numel() < 12
    upstream = torch.randn(24, generator=torch.Generator().manual_seed(22)) if reduction == "none" else None
    flops, loss, grads = _flops_and_grads("wttm", p, backend, reduction, upstream)
    only_kept = {k: x if k in ("student_weight", "teacher_weight", "student_bias", "teacher_bias") else x[kept]
                 for k, x in p.items()}
    kept_flops, kept_loss, kept_grads = _flops_and_grads(
        "wttm", only_kept, backend, reduction, None if upstream is None else upstream[kept])
    every_row = dict(p, target=torch.where(p["target"] == -100, 0, p["target"]))
    assert flops == kept_flops < _flops_and_grads("wttm", every_row, backend, reduction, upstream)[0] / 2
    if reduction == "none":
        assert bool((loss[p["target"] == -100] == 0).all())
        loss = loss[kept]
    torch.testing.assert_close(loss, kept_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads["student_hidden"][kept], kept_grads["student_hidden"], rtol=1e-6, atol=1e-7)
    assert bool((grads["student_hidden"][p["target"] == -100] == 0).all())
    for k in ("student_weight", "student_bias"):
        torch.testing.assert_close(grads[k], kept_grads[k], rtol=1e-5, atol=1e-6)


def _rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_eager_bf16(backend):
    """CCE's criterion: error vs float64 of the fused bf16 path <= that of eager bf16 autograd + tol."""
    p = make_problem(n=64, hidden=32, vocab=200, spread=10.0, seed=15, ignore_fraction=0.0)
    ref_loss, ref_grads = reference_loss_and_grads("wttm", p, beta=2.0)
    loss, grads = fused_loss_and_grads("wttm", p, backend, dtype=torch.bfloat16, chunk_size=24, beta=2.0)

    leaves = {k: p[k].bfloat16().requires_grad_() for k in STUDENT}
    z = leaves["student_hidden"] @ leaves["student_weight"].T + leaves["student_bias"]
    with torch.no_grad():
        v = p["teacher_hidden"].bfloat16() @ p["teacher_weight"].bfloat16().T + p["teacher_bias"].bfloat16()
    eager = reference.paper_wttm_loss(z, v, p["target"], gamma=0.2, beta=2.0)
    eager.backward()

    tol = 1e-3
    assert _rel_err(loss, ref_loss) <= _rel_err(eager.detach(), ref_loss) + tol
    for k in STUDENT:
        assert grads[k].dtype == torch.bfloat16
        fused_err, eager_err = _rel_err(grads[k], ref_grads[k]), _rel_err(leaves[k].grad, ref_grads[k])
        assert fused_err <= eager_err + tol, f"d {k}: fused {fused_err:.3g} vs eager {eager_err:.3g}"


def test_teacher_frozen_parameters_and_no_grad(monkeypatch):
    """No gradient reaches the teacher, even when its weight requires grad; frozen student parts get none;
    under torch.no_grad() the forward computes the loss only."""
    p = make_problem(seed=16)
    hidden = p["student_hidden"].float().requires_grad_()
    weight = p["student_weight"].float()
    teacher_weight = p["teacher_weight"].float().requires_grad_()
    loss = fused_linear_wttm_loss(hidden, weight, p["teacher_hidden"].float(), teacher_weight, p["target"],
                                  chunk_size=8, backend="torch")
    loss.backward()
    assert teacher_weight.grad is None and weight.grad is None
    _, ref_grads = reference_loss_and_grads("wttm", dict(p, student_bias=None, teacher_bias=None))
    assert_close("d student_hidden", ref_grads["student_hidden"], hidden.grad)
    row_grads, run_chunks = [], linear._run_chunks
    monkeypatch.setattr(linear, "_run_chunks",
                        lambda *a, **k: row_grads.append(k.get("row_grad")) or run_chunks(*a, **k))
    with torch.no_grad():
        no_grad_loss = fused_linear_wttm_loss(hidden, weight, p["teacher_hidden"].float(), teacher_weight,
                                              p["target"], backend="torch")
    assert_close("loss", loss.detach(), no_grad_loss)
    assert row_grads == [None]


def test_backward_twice_is_a_clear_error():
    p = make_problem(seed=17)
    hidden = p["student_hidden"].float().requires_grad_()
    loss = fused_linear_wttm_loss(hidden, p["student_weight"].float(), p["teacher_hidden"].float(),
                                  p["teacher_weight"].float(), p["target"], backend="torch")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="recompute the loss"):
        loss.backward()


@pytest.mark.parametrize("module,kind", [(LinearWTTMLoss(gamma=0.2), "wttm"), (LinearTTMLoss(gamma=0.5), "ttm"),
                                         (LinearKDLoss(temperature=2.0), "kd")])
def test_modules(module, kind):
    p = make_problem(seed=18)
    module.backend, module.chunk_size = "torch", 6
    args = {k: None if x is None or not x.is_floating_point() else x.float() for k, x in p.items()}
    out = module(args["student_hidden"], args["student_weight"], args["teacher_hidden"], args["teacher_weight"],
                 p["target"], student_bias=args["student_bias"], teacher_bias=args["teacher_bias"])
    ref, _ = reference_loss_and_grads(kind, p)
    assert_close("loss", ref, out)
    assert "chunk_size=6" in repr(module)


def test_default_chunk_size_from_memory_budget():
    bf16, fp32 = torch.bfloat16, torch.float32
    # 1 GiB on CUDA for two bf16 (C, 128256) buffers: 2093 rows, rounded down to 2048.
    assert default_chunk_size(16384, 128256, bf16, bf16, torch.device("cuda")) == 2048
    assert default_chunk_size(4096, 128256, bf16, bf16, torch.device("cuda")) == 2048
    assert default_chunk_size(16384, 128256, bf16, bf16, torch.device("cpu")) == 256  # the minimum
    assert default_chunk_size(100, 128256, bf16, bf16, torch.device("cpu")) == 100  # never above N
    assert default_chunk_size(10**6, 8192, fp32, fp32, torch.device("cpu")) == 1024
    assert default_chunk_size(10**6, 8192, bf16, bf16, torch.device("cpu"), fp32_scratch=True) == 1024


def _bad(**changes):
    p = make_problem(seed=19)
    args = {k: None if x is None or not x.is_floating_point() else x.float() for k, x in p.items()}
    args["target"] = p["target"]
    args.update(changes.pop("args", {}))
    return args, changes


BAD = [
    ({"args": {"teacher_weight": torch.randn(75, 19), "teacher_bias": None}}, ValueError,
     r"student vocabulary 70.*teacher vocabulary 75"),
    ({"args": {"student_weight": torch.randn(70, 15)}}, ValueError, "student_hidden must have shape"),
    ({"args": {"student_weight": torch.randn(70, 16, dtype=torch.float64)}}, TypeError, "same dtype"),
    ({"args": {"student_bias": torch.randn(69)}}, ValueError, "student_bias must have shape"),
    ({"args": {"teacher_hidden": torch.randn(22, 19)}}, ValueError, "teacher_hidden must have the student's"),
    ({"args": {"teacher_hidden": torch.randn(23, 19, requires_grad=True)}}, ValueError, "torch.no_grad"),
    ({"args": {"student_weight": torch.randn(70)}}, ValueError, "student_weight must be 2-D"),
    ({"args": {"student_hidden": torch.ones(23, 16, dtype=torch.long)}}, TypeError, "student_hidden must be a float"),
    ({"args": {"target": torch.full((23,), 70)}}, ValueError, r"outside \[0, 70\)"),
    ({"args": {"target": torch.zeros(23)}}, TypeError, "integer class indices"),
    ({"args": {"target": torch.zeros(22, dtype=torch.long)}}, ValueError, "target must have"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"chunk_size": 2.5}, ValueError, "chunk_size"),
    ({"vocab_mismatch": "pad"}, ValueError, "vocab_mismatch"),
    ({"reduction": "avg"}, ValueError, "reduction"),
    ({"gamma": 0.0}, ValueError, "gamma"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"ignore_index": 1.5}, TypeError, "ignore_index"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"softcap": 0.0}, ValueError, "softcap must be a finite positive"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"logit_scale": -1.0}, ValueError, "logit_scale must be a finite positive"),
    ({"logit_scale": torch.tensor(2.0)}, TypeError, "logit_scale must be a Python number"),
    ({"num_items_in_batch": 0}, ValueError, "num_items_in_batch must be a finite positive"),
    ({"num_items_in_batch": torch.tensor([3, 4])}, ValueError, "one-element"),
    ({"num_items_in_batch": 12, "reduction": "sum"}, ValueError, "denominator of reduction='mean'"),
]


@pytest.mark.parametrize("changes,error,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_inputs_raise_clear_errors(changes, error, match):
    args, kw = _bad(**changes)
    with pytest.raises(error, match=match):
        fused_linear_wttm_loss(args["student_hidden"], args["student_weight"], args["teacher_hidden"],
                               args["teacher_weight"], args["target"], student_bias=args["student_bias"],
                               teacher_bias=args["teacher_bias"], **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["wttm", "kd"])
def test_fused_linear_loss_components(backend, kind):
    """The logged terms equal the unfused loss's components on the materialised logits."""
    gen = torch.Generator().manual_seed(5)
    h_s, w_s = torch.randn(37, 16, generator=gen), torch.randn(300, 16, generator=gen)
    h_t, w_t = torch.randn(37, 24, generator=gen), torch.randn(300, 24, generator=gen)
    target = torch.randint(0, 300, (37,), generator=gen)
    target[::4] = -100
    scale = {"temperature": 3.0} if kind == "kd" else {"gamma": 0.3}
    linear_fn = {"wttm": ttm_kernels.fused_linear_wttm_loss, "kd": ttm_kernels.fused_linear_kd_loss}[kind]
    fused_fn = {"wttm": ttm_kernels.fused_wttm_loss, "kd": ttm_kernels.fused_kd_loss}[kind]
    loss, parts = linear_fn(h_s * 3, w_s, h_t * 3, w_t, target, chunk_size=10, backend=backend,
                            return_components=True, **scale)
    ref_loss, ref_parts = fused_fn((h_s * 3).double() @ w_s.double().T, (h_t * 3).double() @ w_t.double().T,
                                   target, backend="torch", return_components=True, **scale)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    for name in ("kl", "ce", "weight"):
        torch.testing.assert_close(getattr(parts, name).double(), getattr(ref_parts, name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_wttm_loss_double_backward_is_refused(backend, reduction):
    """The fused linear loss gives first-order gradients: a graph for higher-order ones is refused, never
    silently built without the second-order terms."""
    p = make_problem(seed=21)
    args = {k: None if x is None or not x.is_floating_point() else x.float().to(device_of(backend))
            for k, x in p.items()}
    hidden = args["student_hidden"].requires_grad_()
    loss = fused_linear_wttm_loss(hidden, args["student_weight"], args["teacher_hidden"], args["teacher_weight"],
                                  p["target"].to(hidden.device), reduction=reduction, chunk_size=8,
                                  backend=backend).sum()
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("reduction,head_kw", [("mean", {}), ("none", {}), ("mean", {"softcap": 3.0, "logit_scale": 1.5})],
                         ids=["mean", "none", "mean-softcap"])
def test_fused_linear_wttm_loss_float64_gradcheck(reduction, head_kw):
    """float64 inputs are computed in float64 (the reference on each chunk, float64 row terms and weight
    gradient), so that torch.autograd.gradcheck passes at its default tolerances, soft-cap included."""
    p = make_problem(n=9, hidden=5, vocab=12, seed=22)
    with pytest.raises(ValueError, match="computes in float32"):
        fused_linear_wttm_loss(p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"],
                               p["target"], backend="cpu")

    def loss_of(hidden, weight, bias):
        loss = fused_linear_wttm_loss(hidden, weight, p["teacher_hidden"], p["teacher_weight"], p["target"],
                                      student_bias=bias, teacher_bias=p["teacher_bias"], reduction=reduction,
                                      chunk_size=4, **head_kw)
        assert loss.dtype == torch.float64
        return loss

    inputs = tuple(p[k].clone().requires_grad_() for k in STUDENT)
    assert torch.autograd.gradcheck(loss_of, inputs)


# (form, reduction, head post-processing): both head forms, the gradient in the forward ("mean"/"sum" eagerly)
# and for per-row upstream gradients ("none"), with and without a soft-cap.
COMPILED = [("head", "mean", {"softcap": 20.0}), ("head", "none", {}), ("head_topk", "sum", {"softcap": 20.0}),
            ("head_topk", "none", {})]


@pytest.mark.parametrize("backend", BACKENDS[:2])
@pytest.mark.parametrize("form,reduction,head_kw", COMPILED, ids=[f"{f}-{r}-{'softcap' if h else 'plain'}"
                                                                   for f, r, h in COMPILED])
def test_fused_linear_loss_torch_compile(backend, form, reduction, head_kw):
    """The head forms traced whole by torch.compile(fullgraph=True) (a bias, a 3-D batch, several chunks, ignored
    rows), against the float64 reference; under torch.compile the gradients are computed in the backward."""
    torch._dynamo.reset()  # each case compiles the same loss functions afresh: no recompile limit across cases
    p = make_problem(lead=(3, 7), seed=11)
    upstream = (torch.randn(3, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
                if reduction == "none" else None)
    top = torch.log_softmax(p["teacher_hidden"] @ p["teacher_weight"].T, -1).topk(8, -1)
    if form == "head":
        ref_loss, ref_grads = reference_loss_and_grads("wttm", p, reduction, upstream, **head_kw)
    else:
        leaves = {k: p[k].clone().requires_grad_() for k in STUDENT}
        z = head(leaves["student_hidden"] @ leaves["student_weight"].T + leaves["student_bias"], **head_kw)
        ref_loss = reference.wttm_loss_topk(z, top.indices, top.values, p["target"], gamma=0.2, reduction=reduction)
        ref_loss.backward(upstream)
        ref_grads = {k: x.grad for k, x in leaves.items()}

    args = {k: p[k].float().requires_grad_() for k in STUDENT}
    options = dict(student_bias=args["student_bias"], reduction=reduction, backend=backend, chunk_size=8,
                   gamma=0.2, **head_kw)

    @torch.compile(fullgraph=True, dynamic=False)
    def step(hidden, weight):
        hidden = hidden * 1.0  # a model's hidden states are not leaves
        if form == "head":
            return fused_linear_wttm_loss(hidden, weight, p["teacher_hidden"].float(), p["teacher_weight"].float(),
                                          p["target"], teacher_bias=p["teacher_bias"].float(), **options)
        return ttm_kernels.fused_linear_wttm_loss_topk(hidden, weight, top.indices, top.values.float(), p["target"],
                                                       **options)

    loss = step(args["student_hidden"], args["student_weight"])
    loss.backward(None if upstream is None else upstream.float())
    assert_close("loss", ref_loss, loss.detach())
    for k in STUDENT:
        assert_close(f"d {k}", ref_grads[k], args[k].grad)
