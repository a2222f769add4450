"""The one mechanism every token-reduction method shares, and the `Method` class a method fills in.

A method only decides *who goes where with what weight*: it returns a `TokenAssignment` that maps
each current token to at most one output token, with a rule for how the members of an output
token combine. `apply_assignment` then updates hidden states and token sizes with one row-wise
scatter, and the engine derives the provenance of every original patch from the same record
(docs/architecture.md, "One mechanism for every method").

A method is one class in one file (`analysis/methods/<name>.py`, or a plugin file anywhere) that
declares everything the rest of tokenscope needs: its parameters, what it needs from the block,
where it acts, its own MACs (`own_macs`), how it meets a keep rate's token budget (`budget`), its
colour and marker, and which comparison rows it joins. Nothing outside that file names it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import torch

from ..errors import PlanError
from ..lists import comma_list
from ..plan import ReductionPlan
from ..provenance import KIND_CODE, KINDS  # noqa: F401  (re-exported for method files)
from ..registry import register  # noqa: F401  (re-exported: `from .base import register`)

# What a method may ask the engine to compute at a reducing block ("inside" methods only: the
# block's own attention). Each is computed only when some method asks for it.
#   cls_attention        [B, N-1] head-averaged post-softmax attention of cls to every other token
#   cls_attention_heads  [B, H, N-1] the same per head
#   keys / queries / values              [B, N, d] averaged over heads
#   keys_heads / queries_heads / values_heads  [B, H, N, d] per head
#   attention            [B, H, N, N] the full post-softmax attention (O(N^2) memory; counted in GMACs)
NEEDS: frozenset[str] = frozenset({
    "cls_attention", "cls_attention_heads", "keys", "keys_heads", "queries", "queries_heads",
    "values", "values_heads", "attention",
})

Combine = Union[str, Callable[[torch.Tensor, "TokenAssignment", torch.Tensor], torch.Tensor]]


@dataclass
class Edges:
    """Further contributions beyond each token's primary destination: token `source[b, e]` also goes
    into output `target[b, e]` with `weight[b, e]` (a pruned token squeezed into several tied hosts,
    or propagated over a graph to several kept tokens). `target` -1 marks an unused slot.

    Attributes:
        source, target: [B, E] long; weight: [B, E] float.
    """

    source: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor


@dataclass
class TokenAssignment:
    """Where every current token goes at one reduction stage.

    Attributes:
        dest: [B, N] long, the output token each current token goes to; -1 = discarded. The class
            token (index 0) must go to output 0. It is the token that *holds* the patch in the
            provenance (a token spread over several outputs: the one with the largest weight).
        weight: [B, N] float, each token's weight in its output token.
        n_out: number of output tokens (cls included), the same for every image of the batch (the
            longest image's count when `valid` pads the others).
        kinds: [B, n_out] long codes into `KINDS` (use `token_kinds`); "pad" for padding slots.
        combine: how the members of an output token combine:
            "mean": the weighted mean (weights divided by their sum per output token);
            "sum": the weighted sum with the raw weights (EViT's fused token, methods.md §2);
            a callable `(x [B, N, C], assignment, share [B, N]) -> [B, n_out, C]`, given the
            normalised weights `share` (weight / sum of weights per output token), for a rule of
            the method's own (e.g. a norm-preserving merge); `weighted_rows` does the scatter.
        pruned: optional [B, N] bool, the tokens that lost their own slot at this stage (pruned
            and fused or squeezed into a host); the dispatch maps draw these.
        edges: optional further contributions of tokens into outputs other than `dest` (`Edges`);
            their weights join the sums and the means' denominators.
        sizes: optional [B, n_out] float, the output tokens' sizes when the method defines its own
            (default: the sum of the members' sizes).
        valid: optional [B, n_out] bool, False for padding slots when images keep different token
            counts (ATS); padding is masked out of attention and of every later decision.
        attention: optional [B, H, n_out, n_out] post-softmax attention for the rest of this block,
            for a method acting on the block's own attention (`acts = "attention"`); None: the
            block computes attention on the reduced tokens as usual.
        notes: optional one short text per image about this stage's decision (e.g. PPT's "pooled:
            variance 5.1e-05 < 7e-05"), shown under the picture and in the JSON.
        extra: optional arrays a method wants on its stage record, copied as they are; per patch
            [B, P] or per output token [B, n_out], as the method documents (e.g. TPS's "dispatch":
            [B, n_out] self weight of every output token).
    """

    dest: torch.Tensor
    weight: torch.Tensor
    n_out: int
    kinds: torch.Tensor
    combine: Combine = "mean"
    pruned: torch.Tensor | None = None
    edges: Edges | None = None
    sizes: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    attention: torch.Tensor | None = None
    notes: list[str] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def weighted_rows(x: torch.Tensor, dest: torch.Tensor, weight: torch.Tensor, n_out: int) -> torch.Tensor:
    """`out[b, dest[b, i]] += weight[b, i] * x[b, i]` for every token with dest >= 0: [B, n_out, C].

    A row-wise index_add over the flattened batch rather than scatter_add with an index expanded over
    channels: whole rows are added at once, about twice as fast on the CPU (bench measures it).
    `weight` must already be 0 where dest < 0."""
    batch, _, channels = x.shape
    rows = (dest.clamp(min=0) + torch.arange(batch, device=dest.device).unsqueeze(1) * n_out).reshape(-1)
    out = x.new_zeros(batch * n_out, channels)
    out.index_add_(0, rows, (x * weight.unsqueeze(-1)).reshape(-1, channels))
    return out.view(batch, n_out, channels)


def apply_assignment(assignment: TokenAssignment, x: torch.Tensor, sizes: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Merge, fuse or drop tokens as `assignment` says.

    Args:
        x: [B, N, C] hidden states.
        sizes: [B, N] float, how many original tokens each current token holds.
    Returns:
        (x_out [B, n_out, C], sizes_out [B, n_out], share [B, N], edge_share [B, E] or None);
        `share` is each token's share of its primary output token (weight / sum of weights there,
        edges included, or the raw weight for "sum"), 0 for discarded tokens; `edge_share` the same
        for the edges. Sizes add up over the primary destinations unless the assignment gives its own.
    Raises:
        ValueError: an unknown `combine` rule.
    """
    batch = x.shape[0]
    keep = assignment.dest >= 0
    dest = assignment.dest.clamp(min=0)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    weight = torch.where(keep, assignment.weight.to(x.dtype), zero)
    edges = assignment.edges
    edge_weight = edge_target = None
    if edges is not None:
        edge_target = edges.target.clamp(min=0)
        edge_weight = torch.where(edges.target >= 0, edges.weight.to(x.dtype), zero)
    rule = assignment.combine
    edge_share = edge_weight
    if rule == "sum":
        share = weight
    else:
        # Normalise the [B, N] weights first, so the weighted mean costs no pass over [B, n_out, C].
        denominator = weight.new_zeros(batch, assignment.n_out).scatter_add_(1, dest, weight)
        if edges is not None:
            denominator.scatter_add_(1, edge_target, edge_weight)
        tiny = torch.finfo(x.dtype).tiny
        share = weight / denominator.gather(1, dest).clamp(min=tiny)
        if edges is not None:
            edge_share = edge_weight / denominator.gather(1, edge_target).clamp(min=tiny)
    if rule in ("mean", "sum"):
        out = weighted_rows(x, assignment.dest, share, assignment.n_out)
        if edges is not None:
            sources = x.gather(1, edges.source.clamp(min=0).unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            out = out + weighted_rows(sources, edges.target, edge_share, assignment.n_out)
    elif callable(rule):
        out = rule(x, assignment, share)
    else:
        raise ValueError(f"unknown combine rule {rule!r}: use 'mean', 'sum' or a callable")
    if assignment.sizes is not None:
        sizes_out = assignment.sizes.to(sizes.dtype)
    else:
        sizes_out = sizes.new_zeros(batch, assignment.n_out).scatter_add_(1, dest, torch.where(keep, sizes, torch.zeros_like(sizes)))
    return out, sizes_out, share, edge_share


def token_kinds(body: torch.Tensor | str, n_out: int | None = None, batch: int | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """[B, n_out] kind codes with the class token's kind at index 0.

    Args:
        body: either a kind name for every non-cls output token (then give n_out, batch, device),
            or a [B, n_out - 1] long tensor of codes for them.
    """
    if isinstance(body, str):
        kinds = torch.full((batch, n_out), KIND_CODE[body], dtype=torch.long, device=device)
    else:
        kinds = torch.cat([body.new_zeros(body.shape[0], 1), body.long()], dim=1)
    kinds[:, 0] = KIND_CODE["cls"]
    return kinds


def keep_assignment(kept: torch.Tensor, n_tokens: int, fuse_weight: torch.Tensor | None = None) -> TokenAssignment:
    """"Keep these k tokens, drop or fuse the rest", the assignment of every pruning method.

    Args:
        kept: [B, k] long indices (>= 1) into the current sequence of the tokens that keep a slot,
            in output order.
        n_tokens: N, the current sequence length (cls included).
        fuse_weight: None to drop the other tokens; else [B, N] weights with which all of them
            are summed into one extra "fused" token appended last (EViT, methods.md §2; the
            weights of kept tokens are ignored).
    Returns:
        the assignment `[cls, kept..., (fused)]`, kinds "kept" (and "fused"); `pruned` marks the
        fused tokens. Combine rule "sum" when fusing (the kept tokens have weight 1).
    """
    batch, k = kept.shape
    device = kept.device
    fuse = fuse_weight is not None
    dest = torch.full((batch, n_tokens), k + 1 if fuse else -1, dtype=torch.long, device=device)
    dest[:, 0] = 0
    dest.scatter_(1, kept, torch.arange(1, k + 1, device=device).expand(batch, k))
    n_out = k + 2 if fuse else k + 1
    kinds = token_kinds("kept", n_out, batch, device)
    pruned = None
    weight = torch.ones(batch, n_tokens, dtype=torch.float32, device=device)
    if fuse:
        pruned = dest == k + 1
        weight = torch.where(pruned, fuse_weight.to(weight.dtype), weight)
        kinds[:, -1] = KIND_CODE["fused"]
    return TokenAssignment(dest=dest, weight=weight, n_out=n_out, kinds=kinds, combine="sum" if fuse else "mean", pruned=pruned)


def kept_count(keep_rate: float, n: int) -> int:
    """`math.ceil(keep_rate * n)`, exactly EViT's official formula (`left_tokens =
    math.ceil(keep_rate * (N - 1))`, methods.md §2), in IEEE double, between 1 and n. No rounding
    of the product first: at 240 px (225 patches) and keep rate 0.56, 0.56 * 225 is
    126.00000000000001 and EViT keeps 127."""
    return min(n, max(1, math.ceil(keep_rate * n)))


def complement(selected: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n - s] long: the non-cls token indices 1..n that are not in `selected` [B, s], ascending
    (the pruned / inattentive tokens beside a selection)."""
    batch = selected.shape[0]
    chosen = torch.zeros(batch, n + 1, dtype=torch.bool, device=selected.device)
    chosen[:, 0] = True
    chosen.scatter_(1, selected, True)
    return torch.sort(chosen.to(torch.uint8), dim=1, stable=True).indices[:, : n - selected.shape[1]]


def keep_rate_counts(keep_rate: float, depth: int = 12, n0: int = 197, layers: Sequence[int] = (4, 7, 10), extra: int = 0) -> list[int]:
    """Tokens (cls included) leaving each block for EViT's selection at `keep_rate` (methods.md
    §2): ceil(rho n) non-cls tokens kept at each reducing layer, n counting every non-cls token
    present. `extra` tokens are added after each stage (EViT's fused token: 1). DeiT at 224 px,
    rho 0.7, layers 4, 7, 10: 197 -> 139 -> 98 -> 69 (extra 0), 197 -> 140 -> 100 -> 72 (extra 1).
    The budget every keep-rate method shares, and what others match (`Method.budget`)."""
    counts, n = [], n0
    for block in range(1, depth + 1):
        if block in layers:
            non_cls = n - 1
            kept = kept_count(keep_rate, non_cls)
            if kept < non_cls:
                n = 1 + kept + extra
        counts.append(n)
    return counts


@dataclass(frozen=True)
class ParamSpec:
    """One method parameter: the app's widget and the CLI flag are built from it.

    `kind` is "float", "int", "bool", "choice" or "int_list" (an int or a comma list, e.g. ToMe's r).
    `averaged` marks a parameter whose values are repeats of one setting (a random seed): a sweep
    given several values runs each, and the figures and table show the mean over them
    (`figures.average_repeats`).
    """

    name: str
    default: Any
    kind: str
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] = ()
    averaged: bool = False

    def parse(self, value: Any) -> Any:
        """Convert and validate a user value. Raises ValueError with a one-line reason."""
        if self.kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return bool(value)
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{self.name} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
            return value
        if self.kind == "int_list":
            if isinstance(value, (str, list, tuple)):
                items = tuple(comma_list(value, int, self.name, ValueError, "13 or 16,16,8"))
            else:
                items = (int(value),)
            if not items:
                raise ValueError(f"{self.name} is empty")
            for item in items:
                self._check_range(item)
            return items[0] if len(items) == 1 else items
        try:
            number = int(value) if self.kind == "int" else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a number, got {value!r}") from None
        if self.kind == "float" and math.isnan(number):
            raise ValueError(f"{self.name} must be a number, got NaN")
        self._check_range(number)
        return number

    def _check_range(self, number: float) -> None:
        if self.minimum is not None and number < self.minimum:
            raise ValueError(f"{self.name} must be at least {self.minimum}, got {number}")
        if self.maximum is not None and number > self.maximum:
            raise ValueError(f"{self.name} must be at most {self.maximum}, got {number}")

    def default_text(self) -> str:
        """The default as a user would type it (lists comma-separated)."""
        if isinstance(self.default, tuple):
            return ",".join(map(str, self.default))
        return str(self.default)


@dataclass
class ReduceContext:
    """What a method may read when it decides an assignment.

    Attributes:
        x: [B, N, C] hidden states (after the attention residual for methods acting inside a
            block, the block input for methods acting before one); token 0 is the class token.
        sizes: [B, N] float, original tokens held by each token (cls counts 1, ToMe's convention).
        keep_rate: the plan's keep rate.
        stage: 0-based index of this stage among the plan's reducing layers.
        block_index: 0-based index of the block; depth: the model's number of blocks.
        layers: the plan's 1-based reducing layers.
        params: the plan's parameters, parsed, defaults filled in.
        num_patches: the number of original patches (196 for DeiT at 224 px).
        grid: (rows, cols) of the patch grid, patches in row-major order ((14, 14) for DeiT at
            224 px), or None when the model does not say.
        extras: method weights loaded with the checkpoint (e.g. "score_predictor"), or {}.
        valid: [B, N] bool, False on padding slots once images keep different token counts (ATS),
            else None; a method that may see padding must leave it out of its decisions.
        state: a dict that lives for one forward pass, shared by the method's stages (e.g. a graph
            built at the first stage); starts empty.
        embedding: [B, N0, C] the tokens entering the first block (patch and position embedding).
        cls_attention ... attention: what the method declared in `Method.needs` (see `NEEDS`),
            computed from this block's attention; None when not asked for.
    """

    x: torch.Tensor
    sizes: torch.Tensor
    keep_rate: float
    stage: int
    block_index: int
    params: dict[str, Any]
    num_patches: int
    depth: int = 12
    layers: tuple[int, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)
    valid: torch.Tensor | None = None
    state: dict[str, Any] = field(default_factory=dict)
    embedding: torch.Tensor | None = None
    grid: tuple[int, int] | None = None
    cls_attention: torch.Tensor | None = None
    cls_attention_heads: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    keys_heads: torch.Tensor | None = None
    queries: torch.Tensor | None = None
    queries_heads: torch.Tensor | None = None
    values: torch.Tensor | None = None
    values_heads: torch.Tensor | None = None
    attention: torch.Tensor | None = None


@dataclass(frozen=True)
class StageShape:
    """What a method's own cost depends on at one reducing block (per image).

    Attributes:
        n_in / n_out: non-cls tokens before and after the reduction.
        channels: C; heads: H (head dim C / H).
        keep_rate: the plan's keep rate; params: the method's parameters (defaults filled in).
        acted: False when the stage changed nothing (e.g. keep rate 1.0).
        stage: 0-based index among the reducing layers; layer: 1-based block; depth: the model's
            number of blocks (for methods whose rule depends on the block's place in the network).
    """

    n_in: int
    n_out: int
    channels: int
    heads: int
    keep_rate: float
    params: dict[str, Any]
    acted: bool
    stage: int = 0
    layer: int = 0
    depth: int = 12


# Comparison rows of the main page: each method says which rows it joins (`Method.comparison`).
COMPARISON_ROWS: dict[str, str] = {
    "importance-diversity": "Comparison at one budget: importance, diversity and both (BAT's figure)",
    "pruning": "Pruning methods at the same budget",
    "merging": "Merging methods at the same budget",
}


@dataclass(frozen=True)
class ComparisonEntry:
    """A method's place in a comparison row.

    Attributes:
        row: a key of `COMPARISON_ROWS`; order: its position in the row (ascending);
        title: the panel title; params: parameter overrides for the row (e.g. EViT without fusion).
    """

    row: str
    order: int
    title: str
    params: tuple[tuple[str, Any], ...] = ()


# Distinct colours for methods that declare none (tab10, then tab20's darker half), used in order.
SPARE_COLOURS: tuple[str, ...] = (
    "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173",
    "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363", "#9c9ede", "#cedb9c", "#e7ba52",
)
SPARE_MARKERS: tuple[str, ...] = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "h", "p", "*")


class Method:
    """Base class of a token-reduction method; subclasses fill in the class attributes and `assign`.

    Attributes:
        name: the CLI name (`--method NAME`), a lower-case identifier.
        label: the name shown in the app and figures.
        paper: the source, e.g. "EViT, Liang et al., ICLR 2022".
        acts: "inside" (after the attention residual, before the MLP), "before" (on the block input)
            or "attention" (on the block input, reading the block's own attention of the unreduced
            tokens, which the assignment may hand on, reduced, to the rest of the block: MCTF).
        A method may also define `transform_attention(probs [B, H, N, N], ctx) -> probs`: at its
        reducing blocks the attention is then computed explicitly and the transformed probabilities
        are used for the block's output and for `needs` (GTP-ViT's sparsified attention).
        transform_every_block: True to apply `transform_attention` at every block, not only the
            reducing ones (its `ctx.stage` is -1 at the others): a method whose network computes
            its own attention everywhere (ATS's softmax with eps).
        default_layers: 1-based reducing layers, or None for every block.
        needs: what the engine must compute at a reducing block (a subset of `NEEDS`).
        params: the method's parameters.
        uses_keep_rate: False for methods driven by another budget (ToMe's r).
        colour / marker: its hex colour and matplotlib marker in every chart and figure (None: a
            spare colour / marker by registration order, see `viz.palette`).
        comparison: the comparison rows it joins.
        rank: its place in method lists (ascending; ties by registration order; plugins 1000).
        in_default_sweep: part of `sweep`'s default --methods.
    """

    name: str = ""
    label: str = ""
    paper: str = ""
    acts: str = "inside"
    default_layers: tuple[int, ...] | None = (4, 7, 10)
    needs: frozenset[str] = frozenset()
    uses_keep_rate: bool = True
    transform_every_block: bool = False
    params: tuple[ParamSpec, ...] = ()
    colour: str | None = None
    marker: str | None = None
    comparison: tuple[ComparisonEntry, ...] = ()
    rank: int = 1000
    in_default_sweep: bool = False

    def assign(self, ctx: ReduceContext) -> TokenAssignment | None:
        """The assignment at one stage, or None when the stage changes nothing."""
        raise NotImplementedError

    def own_macs(self, shape: StageShape) -> tuple[float, ...]:
        """The method's own MACs at one stage, per image: (matrix products, element-wise[,
        distance matrices]) (methods.md §8). What the engine computes for `needs` is counted by
        `analysis.gmacs` and must not be included. Default: nothing."""
        return 0.0, 0.0

    def budget(self, keep_rate: float, depth: int, n0: int, *, layers: Sequence[int] | None = None,
               schedule: str = "constant", target_counts: Sequence[int] | None = None) -> ReductionPlan:
        """The plan with which this method meets a keep rate's token budget.

        Args:
            keep_rate: the budget, as EViT's selection without fusion at that keep rate
                (`keep_rate_counts`) at `layers` (default 4, 7, 10).
            depth / n0: blocks and tokens entering the first block (197 for DeiT at 224 px).
            schedule: "constant" (one setting for every reducing block) or "matched" (per block),
                for methods with their own budget parameter; keep-rate methods ignore it.
            target_counts: tokens leaving each block to follow as closely as possible (the main
                page's comparison rows); None: the keep rate's own counts.
        Returns:
            a plan; a keep-rate method returns itself at `keep_rate` (and `layers`).
        Raises:
            PlanError: the method cannot meet budgets (override `budget`).
        """
        if not self.uses_keep_rate:
            raise PlanError(f"{self.label} has no keep rate and defines no budget() to meet one")
        return ReductionPlan.make(self.name, keep_rate, None if layers is None else tuple(layers))

    def check_plan(self, plan: ReductionPlan, depth: int) -> None:
        """Method-specific checks of a plan beyond its parameters' ranges (raise PlanError)."""

    def proportional_attention(self, params: dict[str, Any]) -> bool:
        """True when attention logits get log(size) added for every key (ToMe)."""
        return False

    def unavailable_reason(self, extras: dict[str, Any]) -> str | None:
        """Why the method cannot run with these loaded extras (e.g. no predictor weights), or None."""
        return None

    def describe(self) -> str:
        return f"{self.label} ({self.paper})"

    def param(self, name: str) -> ParamSpec | None:
        """The `ParamSpec` called `name`, or None."""
        return next((spec for spec in self.params if spec.name == name), None)
