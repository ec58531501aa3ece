"""Presets: the keyword arguments of kd_loss that reproduce another framework's distillation loss.

PRESETS maps a name to kd_loss keyword arguments; PRESET_DIFFERENCES says, per name, what of that
framework's loss the arguments do not express, as an exact transformation (tests/test_presets.py checks
each against a transcription of the framework's code, and Liger-Kernel's, TRL's and torchtune's against
their installed code).
Sources read (file, function):

'hinton'     Hinton et al.'s KD, the project's default: alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
             + (1 - alpha) * CE, batch mean.
'liger'      Liger-Kernel src/liger_kernel/chunked_loss/jsd_loss.py (LigerFusedLinearJSDFunction.
             distillation_loss_fn, LigerFusedLinearJSDLoss defaults) with fused_linear_distillation.py
             (LigerFusedLinearDistillationBase._compute_loss): T on both sides, no T^2, generalized JSD
             (beta=0 forward KL, beta=1 reverse KL, m = beta p + (1-beta) q otherwise),
             weight_hard * CE(T=1) + weight_soft * JSD, both summed over tokens / number of non-ignored
             tokens. ops/jsd.py (LigerJSD) has the same beta convention and normalization.
'trl'        TRL trl/trainer/gkd_trainer.py, since 1.x trl/experimental/gkd/gkd_trainer.py
             (GKDTrainer.generalized_jsd_loss, compute_loss): the same
             generalized JSD and beta endpoints; reduction 'batchmean' with labels = sum over non-ignored
             tokens / their number; compute_loss calls it at temperature 1 and adds no CE.
'torchtune'  torchtune torchtune/modules/loss/kd_losses.py (ForwardKLLoss) and
             recipes/knowledge_distillation_single_device.py: (1 - kd_ratio) * CE + kd_ratio *
             (-sum p log q) over non-ignored tokens / their number, no temperature.
'distillkit' DistillKit distillkit/lossfuncs/kl.py (dense_kl_div, KLDLoss.__call__): T on both sides,
             KL summed over tokens where labels >= 0, times T^2, / their number (trainer.py: the mask is
             labels >= 0). Its losses are combined as sum_i w_i L_i / sum_i w_i (trainer.py).
'uste_authors' the USTE authors' code as transcribed in ued_fast/distill_losses.py (authors_kd_loss): the
             teacher's probabilities P = softmax(t) are tempered as if logits, softmax(P / T), soft
             cross-entropy + lambda * CE, no T^2.

Where the formula is a soft cross-entropy (torchtune, uste_authors) it differs from kd_loss's KL by the
teacher's entropy, a constant of the student: the same gradient, a value shifted by that constant.
"""
from __future__ import annotations

import inspect
from types import MappingProxyType

from .reference import kd_loss_reference

PRESETS = MappingProxyType({
    "hinton": MappingProxyType(dict(
        temperature=4.0, alpha=0.9, t2_scale=True, reduction="batchmean", teacher_kind="logits",
        divergence="forward_kl")),
    # LigerFusedLinearJSDLoss defaults: weight_hard_loss = weight_soft_loss = 0.5, beta = 0.5, T = 1.
    "liger": MappingProxyType(dict(
        temperature=1.0, alpha=0.5, t2_scale=False, reduction="batchmean", teacher_kind="logits",
        divergence="jsd", beta=0.5)),
    # GKDConfig's default beta is 0.5; generalized_jsd_loss is called without a temperature (T = 1).
    "trl": MappingProxyType(dict(
        temperature=1.0, alpha=1.0, t2_scale=False, reduction="batchmean", teacher_kind="logits",
        divergence="jsd", beta=0.5)),
    # alpha is the recipe's kd_ratio.
    "torchtune": MappingProxyType(dict(
        temperature=1.0, alpha=0.5, t2_scale=False, reduction="batchmean", teacher_kind="logits",
        divergence="forward_kl")),
    # The KL loss function alone (alpha = 1); T = 2.0 is the temperature of DistillKit's distil_logits.py.
    "distillkit": MappingProxyType(dict(
        temperature=2.0, alpha=1.0, t2_scale=True, reduction="batchmean", teacher_kind="logits",
        divergence="forward_kl")),
    # alpha = 1 / (1 + lambda); lambda = 1 here. The teacher passed is softmax(teacher logits).
    "uste_authors": MappingProxyType(dict(
        temperature=4.0, alpha=0.5, t2_scale=False, reduction="batchmean", teacher_kind="logits",
        divergence="forward_kl")),
})

# What the arguments leave out, per preset, as an exact transformation (one line each).
PRESET_DIFFERENCES = MappingProxyType({
    "hinton": "none",
    "liger": "loss = (weight_hard + weight_soft) * kd_loss(alpha = weight_soft / (weight_hard + weight_soft)); "
             "Liger's zero-padding of a smaller student vocabulary is not modelled",
    "trl": "none (masking by labels == -100 = ignore_index -100); no CE term: alpha = 1",
    "torchtune": "value = kd_loss + alpha * mean over non-ignored rows of H(softmax(teacher)) (soft cross-entropy, "
                 "not KL); same gradient; its -inf student logits are dropped from the sum",
    "distillkit": "mask is labels >= 0 (= ignore_index when -100 is the only negative label); several loss "
                  "functions combine as sum w_i L_i / sum w_i",
    "uste_authors": "teacher = softmax(teacher logits); value = (1 + lambda) * kd_loss(alpha = 1 / (1 + lambda)) "
                    "+ mean H(softmax(softmax(t) / T)); its soft term averages over all rows (no ignore_index)",
})

# TRL and Liger switch divergence at the ends of beta: beta = 0 is forward KL, beta = 1 reverse KL (the
# contract's jsd is 0 at both ends).
BETA_ENDPOINT_DIVERGENCE = MappingProxyType({
    "liger": MappingProxyType({0.0: "forward_kl", 1.0: "reverse_kl"}),
    "trl": MappingProxyType({0.0: "forward_kl", 1.0: "reverse_kl"}),
})

KD_LOSS_KEYWORDS = tuple(name for name, param in inspect.signature(kd_loss_reference).parameters.items()
                         if param.kind is inspect.Parameter.KEYWORD_ONLY)


def preset_kwargs(name: str, **overrides) -> dict:
    """kd_loss keyword arguments for preset `name`, with `overrides` replacing any of them.

    For 'trl' and 'liger', overriding beta to 0 or 1 also selects the divergence those frameworks use
    there (forward_kl, reverse_kl) unless divergence is overridden too."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset_kwargs: name must be one of {tuple(PRESETS)}, got {name!r}")
    unknown = [key for key in overrides if key not in KD_LOSS_KEYWORDS]
    if unknown:
        raise TypeError(f"preset_kwargs: unknown keyword argument {unknown[0]!r} "
                        f"(kd_loss takes {', '.join(KD_LOSS_KEYWORDS)})")
    kwargs = dict(PRESETS[name])
    kwargs.update(overrides)
    endpoints = BETA_ENDPOINT_DIVERGENCE.get(name, {})
    if "beta" in overrides and "divergence" not in overrides and overrides["beta"] in endpoints:
        kwargs["divergence"] = endpoints[overrides["beta"]]
    return kwargs
