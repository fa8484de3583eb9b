"""``LossSpec``: the one description of a loss, its constructors and their validation."""
import dataclasses
import math

import pytest

from ttm_kernels import reference, spec


def test_constructors_set_the_family_members():
    assert spec.wttm(0.3).reference_params() == dict(student_scale=1.0, teacher_scale=0.3, kl_scale=1.0, weighted=True,
                                                      beta=1.0, ce_weight=1.0, ignore_index=-100,
                                                      jsd_beta=0.0, weight_norm="none")
    assert not spec.ttm(0.3).weighted
    kd = spec.kd(4.0, beta=0.9, ce_weight=0.1)
    assert (kd.student_scale, kd.teacher_scale, kd.kl_scale, kd.kl_coef) == (0.25, 0.25, 16.0, 0.9 * 16.0)
    assert spec.kd(4.0, t_squared=False).kl_scale == 1.0
    assert spec.from_scales("ttm", 0.5) == spec.ttm(0.5)
    # Every keyword the reference takes, and nothing else.
    assert set(spec.ttm().reference_params()) <= set(reference.loss_rows.__code__.co_varnames)


def test_spec_is_frozen_and_knows_its_head_post_processing():
    s = spec.wttm(0.2, softcap=30.0, logit_scale=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta = 2.0
    assert s.has_head_post and not s.without_head_post().has_head_post
    assert s.without_head_post().teacher_scale == 0.2
    assert not spec.wttm().has_head_post


def test_spec_teacher_head_defaults_to_the_students_and_can_differ():
    """teacher_softcap / teacher_logit_scale: the student's by default ("student"), else the teacher's own (None:
    no soft-cap), as TRL's separate teacher_final_logit_softcapping and teacher_logit_scale."""
    same = spec.wttm(0.2, softcap=30.0, logit_scale=0.5)
    assert same.student_head == same.teacher_head == (30.0, 0.5)
    own = spec.kd(2.0, softcap=30.0, teacher_softcap=None, teacher_logit_scale=2.0)
    assert own.student_head == (30.0, 1.0) and own.teacher_head == (None, 2.0)
    teacher_only = spec.ttm(0.3, teacher_logit_scale=0.25)
    assert teacher_only.has_head_post and teacher_only.student_head == (None, 1.0)
    assert not own.without_head_post().has_head_post
    assert own != spec.kd(2.0, softcap=30.0)


@pytest.mark.parametrize("build,error,match", [
    (lambda: spec.wttm(0.0), ValueError, "gamma must be a finite positive number"),
    (lambda: spec.kd(math.inf), ValueError, "temperature must be a finite positive number"),
    (lambda: spec.ttm(0.2, beta=math.nan), ValueError, "beta must be a finite number"),
    (lambda: spec.ttm(0.2, ce_weight="1"), TypeError, "ce_weight must be a Python number"),
    (lambda: spec.ttm(0.2, ignore_index=1.5), TypeError, "ignore_index must be an int"),
    (lambda: spec.wttm(0.2, softcap=-1.0), ValueError, "softcap must be a finite positive number"),
    (lambda: spec.wttm(0.2, logit_scale=0), ValueError, "logit_scale must be a finite positive number"),
    (lambda: spec.from_scales("jsd", 1.0), ValueError, "loss must be one of"),
    (lambda: spec.kd(1.0, teacher_softcap=-1.0), ValueError, "teacher_softcap must be a finite positive number"),
    (lambda: spec.kd(1.0, teacher_softcap="same"), TypeError, "teacher_softcap must be a Python number"),
    (lambda: spec.kd(1.0, teacher_logit_scale=0.0), ValueError,
     "teacher_logit_scale must be a finite positive number"),
])
def test_bad_settings_raise_naming_the_argument(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize("jsd_beta", [-0.1, 1.5, math.inf, math.nan], ids=["negative", "above-1", "inf", "nan"])
def test_spec_refuses_a_jsd_beta_outside_0_1(jsd_beta):
    with pytest.raises(ValueError, match="jsd_beta"):
        spec.kd(1.0, jsd_beta=jsd_beta)


def test_spec_constructors_under_torch_compile_warn_nothing():
    """A compiled loss builds its spec uncached: Dynamo would otherwise warn about the lru_cache wrapper."""
    import warnings

    import torch

    from ttm_kernels import fused_wttm_loss

    @torch.compile(fullgraph=True, backend="eager")
    def loss(z, v, target):
        return fused_wttm_loss(z, v, target, gamma=0.3)

    gen = torch.Generator().manual_seed(3)
    z, v = torch.randn(4, 30, generator=gen) * 5, torch.randn(4, 30, generator=gen) * 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss(z, v, torch.tensor([1, 2, -100, 4]))
    assert not [w for w in caught if "lru_cache" in str(w.message)]
    assert spec.wttm(0.3) is spec.wttm(0.3)  # cached outside compile
    with pytest.raises(TypeError, match="gamma"):
        spec.wttm(True)
