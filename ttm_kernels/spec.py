"""One description of a loss: ``LossSpec``, built by ``wttm()``, ``ttm()`` or ``kd()`` and validated once, then
carried as one argument through the public functions, the orchestrators and the reference.

Every loss of the family is an instance of one row loss (``reference.loss_rows``)::

    ce_weight * CE(z, y) + beta * kl_scale * w * KL(softmax(teacher_scale * v) || softmax(student_scale * z))

with ``w`` the WTTM weight U (``weighted``; divided by its largest value at the vocabulary when ``weight_norm`` is
"vocab", see ``LossSpec``) or 1, KL replaced by the reverse KL or the generalised JSD when
``jsd_beta`` is not 0 (``reference.divergence``: TRL's and Liger's convention), and the heads' post-processing
``post(x) = softcap * tanh(logit_scale * x / softcap)`` (or ``logit_scale * x`` without a soft-cap) applied first to
the student's logits and, with the teacher's own ``teacher_softcap`` and ``teacher_logit_scale`` (by default the
student's), to a dense teacher's (a top-k teacher's log-probabilities are already final). Adding a teacher transform
or a divergence means adding a field here, its constructor and its reference.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import torch

DEFAULT_GAMMA = 0.2
DEFAULT_TEMPERATURE = 4.0
# The default of teacher_softcap and teacher_logit_scale: the teacher's head post-processes its logits as the
# student's does (one model family); a value of its own (None: no soft-cap) when the families differ.
AS_STUDENT = "student"
WEIGHT_NORMS = ("none", "vocab")


def vocab_weight_factor(vocab: int, gamma: float) -> float:
    """The factor of ``weight_norm="vocab"``: 1 / max U = V**-max(0, 1 - gamma), U = sum(p**gamma) over the V
    outcomes of a distribution p (largest, V**(1 - gamma), at the uniform p for gamma < 1; 1 at a one-hot p for
    gamma >= 1), so that the normalised weight lies in (0, 1] for every gamma and every V."""
    return float(vocab) ** -max(0.0, 1.0 - gamma)


def check_finite(name: str, value, positive: bool = False) -> float:
    """``value`` as a float when it is a finite (positive) Python number; else an error naming ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite {'positive ' if positive else ''}number, got {value}")
    return float(value)


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_vocab_size(vocab_size, vocab=None) -> None:
    """``vocab_size``: None, or a positive int: the whole vocabulary, which the ranks' shard widths must sum to
    (checked in the agreement), and, given ``vocab`` (the columns of a call without a process group), its width."""
    if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)
                                   or vocab_size < 1):
        raise ValueError(f"vocab_size must be None or a positive int, got {vocab_size!r}")
    if vocab is not None and vocab_size is not None and vocab != vocab_size:
        raise ValueError(f"vocab_size={vocab_size}, but the student's logits have {vocab} columns (without "
                         "process_group, a call holds the whole vocabulary)")


def check_weight_norm(weight_norm) -> str:
    """``weight_norm`` as given when it is one of ``WEIGHT_NORMS``; else a ValueError naming it."""
    if not isinstance(weight_norm, str) or weight_norm not in WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {WEIGHT_NORMS}, got {weight_norm!r}")
    return weight_norm


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The loss's scalars (see the module docstring); immutable, validated when built. ``name`` is the family
    member ("wttm", "ttm", "kd"), for messages and reprs only. ``teacher_softcap`` and ``teacher_logit_scale``
    given as ``AS_STUDENT`` ("student", their default) take the student's ``softcap`` and ``logit_scale``.

    ``weight_norm`` (WTTM only): "none" (default), the paper's weight U = sum(softmax(v)**gamma), which ranges from
    1 to V**(1 - gamma) and so grows with the vocabulary V (at gamma 0.2: up to 40 at V = 100, 4,096 at V = 32k);
    "vocab", U divided by that largest value (``vocab_weight_factor``), so the weight lies in (0, 1] whatever V.
    The factor is a constant of (gamma, V): no batch statistic, so gradient accumulation stays exact; V is the
    whole vocabulary of the student's logits (under vocabulary parallelism every rank uses the global V, not its
    shard's width), also for a top-k teacher, whose U sums over its k ids and the tail bucket. Every orchestrator
    resolves V once (``at_vocab``, which sets ``norm_vocab``); the factor then folds into ``kl_coef``, the one
    factor every kernel takes, and ``weight_factor`` scales the weight that the logs report."""

    name: str
    student_scale: float
    teacher_scale: float
    kl_scale: float
    weighted: bool
    beta: float = 1.0
    ce_weight: float = 1.0
    ignore_index: int = -100
    softcap: Optional[float] = None
    logit_scale: float = 1.0
    jsd_beta: float = 0.0
    teacher_softcap: Optional[float] | str = AS_STUDENT
    teacher_logit_scale: float | str = AS_STUDENT
    weight_norm: str = "none"
    norm_vocab: Optional[int] = dataclasses.field(default=None, repr=False)

    def __post_init__(self):
        for name, student_value in (("teacher_softcap", self.softcap), ("teacher_logit_scale", self.logit_scale)):
            value = getattr(self, name)
            if isinstance(value, str) and value == AS_STUDENT:
                object.__setattr__(self, name, student_value)
        for name in ("student_scale", "teacher_scale", "kl_scale", "logit_scale", "teacher_logit_scale"):
            object.__setattr__(self, name, check_finite(name, getattr(self, name), positive=True))
        for name in ("beta", "ce_weight"):
            object.__setattr__(self, name, check_finite(name, getattr(self, name)))
        check_flag("weighted", self.weighted)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        for name in ("softcap", "teacher_softcap"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, check_finite(name, getattr(self, name), positive=True))
        jsd_beta = check_finite("jsd_beta", self.jsd_beta)
        if not 0.0 <= jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must lie in [0, 1] (0: forward KL, 1: reverse KL, else the generalised "
                             f"JSD), got {jsd_beta}")
        object.__setattr__(self, "jsd_beta", jsd_beta)
        check_weight_norm(self.weight_norm)
        if self.weight_norm != "none" and not self.weighted:
            raise ValueError(f"weight_norm={self.weight_norm!r} normalises WTTM's weight U, and {self.name} has no "
                             "weight (it is 1 whatever the vocabulary): use loss 'wttm', or weight_norm='none'")
        if self.norm_vocab is not None and (isinstance(self.norm_vocab, bool) or not isinstance(self.norm_vocab, int)
                                            or self.norm_vocab < 1):
            raise ValueError(f"norm_vocab must be None or a positive int, got {self.norm_vocab!r}")

    @property
    def weight_factor(self) -> float:
        """What multiplies the weight U: 1, or with ``weight_norm="vocab"`` ``vocab_weight_factor`` at the
        vocabulary ``at_vocab`` resolved (an error before: a kernel must never get an unnormalised weight)."""
        if self.weight_norm == "none":
            return 1.0
        if self.norm_vocab is None:
            raise RuntimeError("ttm_kernels internal error: weight_norm='vocab' needs the vocabulary, and this spec "
                               "was not resolved with at_vocab(V)")
        return vocab_weight_factor(self.norm_vocab, self.teacher_scale)

    def at_vocab(self, vocab: int) -> "LossSpec":
        """This spec for a vocabulary of ``vocab`` ids (the whole vocabulary of the student's logits): itself
        unless ``weight_norm`` depends on it."""
        if self.weight_norm == "none" or self.norm_vocab == vocab:
            return self
        return _at_vocab(self, vocab)

    @property
    def kl_coef(self) -> float:
        """The kernels' factor of the row's KL (times the weight U they compute): beta * kl_scale * weight_factor."""
        return self.beta * self.kl_scale * self.weight_factor

    @property
    def student_head(self) -> tuple:
        """The student head's post-processing: ``(softcap, logit_scale)``."""
        return self.softcap, self.logit_scale

    @property
    def teacher_head(self) -> tuple:
        """A dense teacher head's post-processing: ``(teacher_softcap, teacher_logit_scale)``."""
        return self.teacher_softcap, self.teacher_logit_scale

    @property
    def has_head_post(self) -> bool:
        """Whether a head's post-processing changes its logits (a soft-cap, or a logit scale other than 1)."""
        return any(softcap is not None or scale != 1.0 for softcap, scale in (self.student_head, self.teacher_head))

    def without_head_post(self) -> "LossSpec":
        """This spec for logits that already went through the heads' post-processing."""
        return dataclasses.replace(self, softcap=None, logit_scale=1.0, teacher_softcap=None, teacher_logit_scale=1.0)

    def reference_params(self) -> dict:
        """The keyword arguments of ``reference.loss_rows`` (and ``topk_loss_rows``) that this spec sets."""
        return dict(student_scale=self.student_scale, teacher_scale=self.teacher_scale, kl_scale=self.kl_scale,
                    weighted=self.weighted, beta=self.beta, ce_weight=self.ce_weight, ignore_index=self.ignore_index,
                    jsd_beta=self.jsd_beta, weight_norm=self.weight_norm)

    @property
    def kernel_scales(self) -> list:
        """The ops' ``scales`` (``_ops``): [student_scale, teacher_scale, kl_coef, ce_weight, jsd_beta]."""
        return [self.student_scale, self.teacher_scale, self.kl_coef, self.ce_weight, self.jsd_beta]

    def kernel_params(self) -> dict:
        """The scalar keyword arguments every kernel launcher takes (``_ops._params``)."""
        return dict(student_scale=self.student_scale, teacher_scale=self.teacher_scale, kl_coef=self.kl_coef,
                    ce_weight=self.ce_weight, ignore_index=self.ignore_index, jsd_beta=self.jsd_beta)


def _cached(builder):
    """``builder`` behind a typed LRU cache (a training loop builds the same spec every step: 0.4 us instead of
    5; typed, so that a bool is never taken for a cached 1). Under torch.compile the builder runs uncached: Dynamo
    traces through the cache wrapper anyway and warns about it. Unhashable arguments (a tensor where a number
    belongs) go to the builder, whose validation names them."""
    cached = functools.lru_cache(maxsize=256, typed=True)(builder)

    @functools.wraps(builder)
    def build(*args, **kwargs):
        if torch.compiler.is_compiling():
            return builder(*args, **kwargs)
        try:
            return cached(*args, **kwargs)
        except TypeError:
            return builder(*args, **kwargs)

    return build


@_cached
def _at_vocab(spec: LossSpec, vocab: int) -> LossSpec:
    return dataclasses.replace(spec, norm_vocab=vocab)


@_cached
def wttm(gamma: float = DEFAULT_GAMMA, **options) -> LossSpec:
    """Weighted TTM: ``U * KL(softmax(gamma * v) || softmax(z))``, U = sum(softmax(v)**gamma); no student
    temperature, no T^2. ``options``: beta, ce_weight, ignore_index, softcap, logit_scale, jsd_beta,
    teacher_softcap, teacher_logit_scale, weight_norm ("vocab": U / max U at the vocabulary, see ``LossSpec``)."""
    gamma = check_finite("gamma", gamma, positive=True)
    return LossSpec("wttm", 1.0, gamma, 1.0, True, **options)


@_cached
def ttm(gamma: float = DEFAULT_GAMMA, **options) -> LossSpec:
    """TTM: ``KL(softmax(gamma * v) || softmax(z))``."""
    gamma = check_finite("gamma", gamma, positive=True)
    return LossSpec("ttm", 1.0, gamma, 1.0, False, **options)


@_cached
def kd(temperature: float = DEFAULT_TEMPERATURE, *, t_squared: bool = True, **options) -> LossSpec:
    """Hinton KD: ``T^2 * KL(softmax(v / T) || softmax(z / T))``; ``t_squared=False`` drops the T^2 factor
    (Liger's convention, ``FusedLinearDistillLoss``)."""
    temperature = check_finite("temperature", temperature, positive=True)
    return LossSpec("kd", 1.0 / temperature, 1.0 / temperature, temperature**2 if t_squared else 1.0, False,
                    **options)


def from_scales(name: str, scale: float, **options) -> LossSpec:
    """The spec of the family member ``name`` ("wttm", "ttm": ``scale`` is gamma; "kd": the temperature)."""
    constructors = {"wttm": wttm, "ttm": ttm, "kd": kd}
    if name not in constructors:
        raise ValueError(f"loss must be one of {tuple(constructors)}, got {name!r}")
    return constructors[name](scale, **options)
