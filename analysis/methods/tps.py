"""Token pruning and squeezing (TPS: eTPS, dTPS) and DynamicViT's learned token pruning.

Sources: Wei et al., "Joint Token Pruning and Squeezing Towards More Aggressive Compression of Vision
Transformers", CVPR 2023 (eTPS, dTPS); Rao et al., "DynamicViT: Efficient Vision Transformers with
Dynamic Token Sparsification", NeurIPS 2021 (the score predictor). Spec: methods.md §3.

The squeeze operator (methods.md §3) is written as one `TokenAssignment`: every pruned token goes
to its most similar kept token (its host) with weight e^{c_jh}, every kept token to itself with
weight e (its logit is fixed at 1), and the weighted mean turns this into
`R'_h = (e R_h + sum_j e^{c_jh} Q_j) / (e + sum_j e^{c_jh})`. The weights are stored divided by e
(self weight 1, pruned weight e^{c_jh - 1}): the shares are the same and the exponent stays small.

The dTPS / DynamicViT predictor runs straight from the tensors of the checkpoint's
`score_predictor.*` weights with `torch.nn.functional` (no module is built, nothing is cached and
the shared model is never touched). Key names follow the official DynamicViT and TPS checkpoints
(`PredictorLG`: `in_conv` = LayerNorm, Linear, GELU; `out_conv` = Linear, GELU, Linear, GELU,
Linear, LogSoftmax), so those checkpoints load as they are:
`score_predictor.{s}.in_conv.0.{weight,bias}`, `.in_conv.1.*`, `.out_conv.0.*`, `.out_conv.2.*`,
`.out_conv.4.*` for stage s = 0, 1, 2.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import WeightsError
from .base import (
    KIND_CODE, ComparisonEntry, Edges, Method, ParamSpec, ReduceContext, StageShape, TokenAssignment, complement,
    keep_assignment, register, token_kinds,
)
from .evit import select_attentive

# nn.LayerNorm's default eps, which PredictorLG uses (the backbone's LayerNorms use 1e-6).
PREDICTOR_LN_EPS = 1e-5
# (name, shape as a function of the embedding width C) of one stage's predictor tensors.
PREDICTOR_TENSORS: tuple[tuple[str, Any], ...] = (
    ("in_conv.0.weight", lambda c: (c,)),
    ("in_conv.0.bias", lambda c: (c,)),
    ("in_conv.1.weight", lambda c: (c, c)),
    ("in_conv.1.bias", lambda c: (c,)),
    ("out_conv.0.weight", lambda c: (c // 2, c)),
    ("out_conv.0.bias", lambda c: (c // 2,)),
    ("out_conv.2.weight", lambda c: (c // 4, c // 2)),
    ("out_conv.2.bias", lambda c: (c // 4,)),
    ("out_conv.4.weight", lambda c: (2, c // 4)),
    ("out_conv.4.bias", lambda c: (2,)),
)
PREDICTOR_PREFIX = "score_predictor"


# ----------------------------------------------------------------------------------------------
# The squeeze operator
# ----------------------------------------------------------------------------------------------

def cosine_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`v / (||v||_2 + eps)` along the last dimension (TPS's normalisation, methods.md §3)."""
    return x / (x.norm(dim=-1, keepdim=True) + eps)


def squeeze_hosts(x: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor, tau: float = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each pruned token's hosts and squeeze logit (methods.md §3, steps 1 and 2).

    As the official `TPSModule` (`cos == rowmax`), a pruned token whose similarity ties between
    several kept tokens is squeezed into every tied host.

    Args:
        x: [B, N, C] hidden states (not keys).
        kept: [B, k] long indices of the kept tokens (hosts) in `x`, k >= 1.
        pruned: [B, m] long indices of the pruned tokens in `x`.
        tau: temperature of the cosine similarity, > 0.
    Returns:
        (host [B, m] long, the position in `kept` of each pruned token's first (lowest-position)
         most similar kept token; logit [B, m] float32, its cosine similarity divided by tau,
         c_{j h(j)}; tied [B, m, k] bool, every host whose similarity equals that maximum).
    """
    channels = x.shape[-1]
    hosts = cosine_normalize(x.float().gather(1, kept.unsqueeze(-1).expand(-1, -1, channels)))
    guests = cosine_normalize(x.float().gather(1, pruned.unsqueeze(-1).expand(-1, -1, channels)))
    similarity = guests @ hosts.transpose(1, 2) / tau  # [B, m, k]
    logit = similarity.amax(dim=-1)
    tied = similarity == logit.unsqueeze(-1)
    host = tied.to(torch.uint8).argmax(dim=-1)  # the first of the tied hosts
    return host, logit, tied


def squeeze_assignment(x: torch.Tensor, kept: torch.Tensor, pruned: torch.Tensor, tau: float = 1.0) -> TokenAssignment:
    """The TPS squeeze as a `TokenAssignment`: output `[cls, kept (in the given order)]`.

    Args:
        x: [B, N, C] hidden states, token 0 = cls.
        kept: [B, k] long indices (>= 1) of the tokens that keep their slot, in output order.
        pruned: [B, m] long indices (>= 1) of the other non-cls tokens (m may be 0).
        tau: similarity temperature (TPS's default 1).
    Returns:
        the assignment (n_out = k + 1, weighted mean) with kinds "host" for kept tokens that
        received at least one pruned token, "kept" for the rest; `pruned` marks the squeezed
        tokens. A pruned token tied between several hosts goes to the first as its `dest` and to
        the others as `edges`, with the same weight e^{c_jh} in each. `extra["dispatch"]` is
        [B, n_out] float, each output token's own share e / (e + sum_j e^{c_jh}) (1 where nothing was
        received, and for cls). The share of each pruned token in its host, e^{c_jh} / den_h, is
        what `apply_assignment` returns (the engine keeps it per patch as `Stage.patch_weight`, and
        the other hosts' shares as `Stage.patch_edges`).
    """
    batch, n = x.shape[:2]
    k, m = kept.shape[1], pruned.shape[1]
    device = x.device
    dest = torch.zeros(batch, n, dtype=torch.long, device=device)
    weight = torch.ones(batch, n, dtype=torch.float32, device=device)
    slots = torch.arange(1, k + 1, device=device).expand(batch, k)
    dest.scatter_(1, kept, slots)
    received = torch.zeros(batch, k + 1, dtype=torch.float32, device=device)
    edges = None
    if m > 0:
        host, logit, tied = squeeze_hosts(x, kept, pruned, tau)
        dest.scatter_(1, pruned, host + 1)
        # Divided by e: self weight 1, pruned e^{c - 1}; shares unchanged, exponent kept small.
        guest_weight = torch.exp(logit - 1.0)
        weight.scatter_(1, pruned, guest_weight)
        received.scatter_add_(1, host + 1, guest_weight)
        others = tied.scatter(2, host.unsqueeze(-1), False)  # tied hosts beyond the first
        if bool(others.any()):
            edges = _tie_edges(others, pruned, guest_weight)
            received.scatter_add_(1, edges.target.clamp(min=0), torch.where(edges.target >= 0, edges.weight, 0.0))
    self_share = 1.0 / (1.0 + received)
    kinds = token_kinds(torch.where(received[:, 1:] > 0, KIND_CODE["host"], KIND_CODE["kept"]))
    pruned_mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    pruned_mask.scatter_(1, pruned, True)
    return TokenAssignment(dest=dest, weight=weight, n_out=k + 1, kinds=kinds, pruned=pruned_mask, edges=edges,
                           extra={"dispatch": self_share})


def _tie_edges(others: torch.Tensor, pruned: torch.Tensor, guest_weight: torch.Tensor) -> Edges:
    """`Edges` from [B, m, k] extra tied hosts: pruned token -> host slot (1-based), padded with -1."""
    batch = others.shape[0]
    per_image = others.flatten(1).sum(dim=1)
    width = int(per_image.max())
    image, j, h = others.nonzero(as_tuple=True)
    slot = torch.arange(image.numel(), device=others.device) - torch.cumsum(per_image, 0).sub(per_image)[image]
    source = pruned.new_zeros(batch, width)
    target = pruned.new_full((batch, width), -1)
    weight = guest_weight.new_zeros(batch, width)
    source[image, slot] = pruned[image, j]
    target[image, slot] = h + 1
    weight[image, slot] = guest_weight[image, j]
    return Edges(source=source, target=target, weight=weight)


TAU = ParamSpec(
    "tau", 1.0, "float",
    "Temperature of the cosine similarity between pruned and kept tokens (TPS default 1); the host keeps logit 1.",
    minimum=0.05, maximum=100.0,
)


def squeeze_macs(shape: StageShape) -> tuple[float, float]:
    """The squeeze's own MACs (methods.md §3, §8): the cosine similarities of the m pruned tokens to
    the k hosts (matrix product m k C), then every token enters one weighted mean ((m + k) C)."""
    if not shape.acted:
        return 0.0, 0.0
    m = shape.n_in - shape.n_out
    return float(m * shape.n_out * shape.channels), float((m + shape.n_out) * shape.channels)


@register
class ETPS(Method):
    name = "etps"
    rank = 20
    in_default_sweep = True
    label = "eTPS"
    paper = "TPS, Wei et al., CVPR 2023"
    needs = frozenset({"cls_attention"})
    colour = "#ff7f0e"
    marker = "s"
    params = (TAU,)
    comparison = (ComparisonEntry("importance-diversity", 4, "eTPS"),)

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The squeeze (`squeeze_macs`)."""
        return squeeze_macs(shape)

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """eTPS at one stage: EViT's selection (top ceil(rho n) class attention, descending), then
        the pruned tokens are squeezed into their most similar kept token (methods.md §3).
        Output `[cls, kept (descending class attention)]`, no extra token."""
        attention = ctx.cls_attention
        n = attention.shape[1]
        kept = select_attentive(attention, ctx.keep_rate)
        if kept.shape[1] == n:
            return None
        return squeeze_assignment(ctx.x, kept, complement(kept, n), ctx.params["tau"])


# ----------------------------------------------------------------------------------------------
# The DynamicViT score predictor
# ----------------------------------------------------------------------------------------------

def predictor_stages(weights: dict[str, torch.Tensor]) -> list[int]:
    """The stage indices that `weights` (a `score_predictor` state dict without the prefix) has
    any tensor for, sorted."""
    stages = set()
    for key in weights:
        head = key.split(".", 1)[0]
        if head.isdigit():
            stages.add(int(head))
    return sorted(stages)


def predictor_problems(weights: dict[str, torch.Tensor]) -> list[str]:
    """What is wrong with a `score_predictor` state dict, as short phrases (empty when it fits).

    Checks every stage 0..S-1 for the ten tensors of methods.md §3's predictor with the shapes the
    embedding width C (read from stage 0's LayerNorm) implies, and reports missing, unexpected and
    mismatched keys by their full checkpoint names (`score_predictor.1.out_conv.4.bias`).
    """
    stages = predictor_stages(weights)
    if not stages:
        return ["no score_predictor.<stage>.* tensors"]
    width_key = "0.in_conv.0.weight"
    width = int(weights[width_key].shape[0]) if width_key in weights and weights[width_key].dim() == 1 else None
    expected: dict[str, tuple[int, ...] | None] = {}
    for stage in range(max(stages) + 1):
        for name, shape in PREDICTOR_TENSORS:
            expected[f"{stage}.{name}"] = None if width is None else tuple(shape(width))
    problems = []
    missing = [key for key in expected if key not in weights]
    unexpected = sorted(key for key in weights if key not in expected)
    mismatched = [
        f"{PREDICTOR_PREFIX}.{key} {tuple(weights[key].shape)} (expected {expected[key]})"
        for key in expected if key in weights and expected[key] is not None and tuple(weights[key].shape) != expected[key]
    ]
    if width is None:
        problems.append(f"{PREDICTOR_PREFIX}.{width_key} (the LayerNorm weight that gives the width) is missing or not 1-D")
    if missing:
        problems.append("missing " + ", ".join(f"{PREDICTOR_PREFIX}.{key}" for key in missing))
    if unexpected:
        problems.append("unexpected " + ", ".join(f"{PREDICTOR_PREFIX}.{key}" for key in unexpected))
    if mismatched:
        problems.append("shape mismatch " + ", ".join(mismatched))
    return problems


def predictor_keep_log_prob(weights: dict[str, torch.Tensor], stage: int, tokens: torch.Tensor) -> torch.Tensor:
    """The keep log-probability of every token from stage `stage`'s predictor (methods.md §3).

    `LN -> Linear(C, C) -> GELU`; local features `[:C/2]`, global feature = mean of `[C/2:]` over
    the tokens (DynamicViT's policy-weighted mean with every token present, i.e. the plain mean, as
    at inference); concatenated, `Linear(C, C/2) -> GELU -> Linear(C/2, C/4) -> GELU ->
    Linear(C/4, 2) -> LogSoftmax`; channel 0 is "keep".

    Args:
        weights: the `score_predictor` state dict (keys like "0.in_conv.0.weight").
        stage: 0-based predictor index.
        tokens: [B, n, C] the non-cls tokens.
    Returns:
        [B, n] float32 log-probability of keeping each token.
    """
    def w(name: str) -> torch.Tensor:
        return weights[f"{stage}.{name}"].to(device=tokens.device, dtype=torch.float32)

    x = tokens.float()
    channels = x.shape[-1]
    x = F.layer_norm(x, (channels,), w("in_conv.0.weight"), w("in_conv.0.bias"), eps=PREDICTOR_LN_EPS)
    x = F.gelu(F.linear(x, w("in_conv.1.weight"), w("in_conv.1.bias")))
    half = channels // 2
    local, global_ = x[..., :half], x[..., half:].mean(dim=1, keepdim=True)
    x = torch.cat([local, global_.expand(-1, x.shape[1], -1)], dim=-1)
    x = F.gelu(F.linear(x, w("out_conv.0.weight"), w("out_conv.0.bias")))
    x = F.gelu(F.linear(x, w("out_conv.2.weight"), w("out_conv.2.bias")))
    x = F.linear(x, w("out_conv.4.weight"), w("out_conv.4.bias"))
    return F.log_softmax(x, dim=-1)[..., 0]


def predictor_keep_count(keep_rate: float, stage: int, num_patches: int) -> int:
    """`int(num_patches * keep_rate ** (stage + 1))`, exactly the official DynamicViT / TPS formula
    (`keep_ratio ** (k + 1)`, `int(init_n * ratio)`: 137, 96, 67 of 196 at 0.7); at least 1."""
    return max(1, int(num_patches * keep_rate ** (stage + 1)))


class _PredictorMethod(Method):
    """dTPS and DynamicViT: a learned predictor before blocks 4, 7, 10 (methods.md §3)."""

    acts = "before"
    paper = ""
    squeeze = True

    def unavailable_reason(self, extras: dict[str, Any]) -> str | None:
        weights = (extras or {}).get(PREDICTOR_PREFIX)
        if not weights:
            return (
                "no score-predictor weights are loaded; load a DynamicViT or dTPS checkpoint that holds "
                "score_predictor.* (CLI: --weights PATH; app: a checkpoint file as the weights)"
            )
        problems = predictor_problems(weights)
        if problems:
            return "the checkpoint's score-predictor weights do not fit: " + "; ".join(problems)
        return None

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """Keep the `int(P * rho^s)` tokens with the highest keep log-probability (descending, as
        DynamicViT's argsort), then squeeze (dTPS) or drop (DynamicViT) the rest.

        Raises WeightsError when the predictor is missing, malformed, narrower or wider than the
        model, or has no stage for this reducing layer."""
        reason = self.unavailable_reason(ctx.extras)
        if reason:
            raise WeightsError(f"{self.label} cannot run: {reason}")
        weights = ctx.extras[PREDICTOR_PREFIX]
        stages = predictor_stages(weights)
        if ctx.stage >= len(stages):
            raise WeightsError(
                f"{self.label}: the checkpoint has {len(stages)} score predictors but the plan reduces at more layers; "
                f"use at most {len(stages)} layers (the defaults are 4,7,10)"
            )
        width = int(weights["0.in_conv.0.weight"].shape[0])
        if width != ctx.x.shape[-1]:
            raise WeightsError(f"{self.label}: the score predictor is for width {width} but the model's tokens have width {ctx.x.shape[-1]}")
        batch, big_n, _ = ctx.x.shape
        n = big_n - 1
        keep = min(n, predictor_keep_count(ctx.keep_rate, ctx.stage, ctx.num_patches))
        if keep >= n:
            return None
        score = predictor_keep_log_prob(weights, ctx.stage, ctx.x[:, 1:])
        order = torch.sort(score, dim=1, descending=True, stable=True).indices + 1
        kept, pruned = order[:, :keep], order[:, keep:]
        if self.squeeze:
            return squeeze_assignment(ctx.x, kept, pruned, ctx.params["tau"])
        return keep_assignment(kept, big_n)

    def own_macs(self, shape: StageShape) -> tuple[float, float]:
        """The predictor's four linear layers on every token (methods.md §3), plus the squeeze for dTPS."""
        c = shape.channels
        predictor = float(shape.n_in * (c * c + c * (c // 2) + (c // 2) * (c // 4) + (c // 4) * 2))
        matmul, elementwise = squeeze_macs(shape) if self.squeeze else (0.0, 0.0)
        return predictor + matmul, elementwise


@register
class DTPS(_PredictorMethod):
    name = "dtps"
    rank = 30
    label = "dTPS"
    paper = "TPS, Wei et al., CVPR 2023"
    colour = "#8c564b"
    marker = "P"
    squeeze = True
    params = (TAU,)


@register
class DynamicViT(_PredictorMethod):
    name = "dynamicvit"
    rank = 40
    label = "DynamicViT"
    paper = "DynamicViT, Rao et al., NeurIPS 2021"
    colour = "#e377c2"
    marker = "X"
    squeeze = False
    params = ()
