"""Provenance: where every original patch went at each reduction stage (methods.md §7).

Two shapes of the same record, and nothing else:
- `Stage`: one stage for a whole batch, as torch tensors, what `engine.run` returns;
- `StageRecord`: one image's stage as numpy arrays, what every picture draws and what
  `inspect --json` prints (`to_json` / `from_json` are the one JSON format).

Token kinds are stored as small integer codes into `KINDS`; index 0 is always the class token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

# Token kinds, as the CLI JSON spells them (methods.md §7).
# "pad" marks the empty slots of an image that keeps fewer tokens than others in its batch (ATS).
KINDS: tuple[str, ...] = ("cls", "kept", "fused", "host", "pair", "cluster", "merged", "pad")
KIND_CODE: dict[str, int] = {name: code for code, name in enumerate(KINDS)}


def _squeezes(patch_pruned: Any, has_host: bool) -> bool:
    """The one test for "this stage squeezes pruned tokens into host tokens" (TPS, methods.md §3):
    patches were pruned into other tokens and at least one output token is a host."""
    return patch_pruned is not None and has_host


@dataclass
class Stage:
    """Provenance of one reduction stage (methods.md §7), for a batch.

    Attributes:
        layer: 1-based block index where the stage acted.
        patch_to_token: [B, P] long, for every original patch (row-major) the token holding it
            after the stage, -1 if discarded; 0 is cls, so patch tokens start at 1.
        token_sizes: [B, n_out] long, patches held by each output token (cls holds none: 0).
        token_kinds: [B, n_out] long codes into `KINDS`.
        cls_attention: [B, P] float, class attention of the token that held each patch just
            before the stage (NaN for a patch already discarded), or None for methods that do not
            score by class attention.
        patch_pruned: [B, P] bool, patches whose token was pruned at this stage and sent into
            another token (fused or squeezed); the dispatch maps draw these.
        patch_weight: [B, P] float, the share of each patch's source token in its destination
            token (see `methods.base.apply_assignment`).
        patch_edges: (patch, token, share), each [B, M], for patches whose token also went into
            tokens other than the one holding it (ties, propagation); padded with -1 / NaN.
        valid: [B, n_out] bool, False for padding slots (images keeping different counts), or None.
        notes: one text per image about the stage's decision (`TokenAssignment.notes`), or None.
        extra: method-specific arrays (e.g. a predictor's keep score).
    """

    layer: int
    patch_to_token: torch.Tensor
    token_sizes: torch.Tensor
    token_kinds: torch.Tensor
    cls_attention: torch.Tensor | None = None
    patch_pruned: torch.Tensor | None = None
    patch_weight: torch.Tensor | None = None
    patch_edges: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    valid: torch.Tensor | None = None
    notes: list[str] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        """The batch's sequence length after the stage (padding included)."""
        return int(self.token_kinds.shape[1])

    def image_tokens(self, index: int = 0) -> int:
        """Image `index`'s own token count after the stage (padding excluded)."""
        return self.n_tokens if self.valid is None else int(self.valid[index].sum())

    def kind_names(self, index: int = 0) -> list[str]:
        """The kinds of image `index`'s own output tokens as names (padding left out)."""
        return [KINDS[code] for code in self.token_kinds[index, : self.image_tokens(index)].tolist()]

    def squeezes(self, index: int = 0) -> bool:
        """True when image `index` had pruned tokens squeezed into host tokens at this stage."""
        return _squeezes(self.patch_pruned, bool((self.token_kinds[index] == KIND_CODE["host"]).any()))


@dataclass(frozen=True)
class StageRecord:
    """One image's provenance at one reduction stage, as numpy arrays (methods.md §7).

    Attributes:
        layer: 1-based block where the stage acted.
        patch_to_token: [P] int, token holding each original patch after the stage (-1 discarded, 0 cls).
        token_kinds: n_out kind names (see `KINDS`).
        token_sizes: [n_out] int, patches held per token.
        cls_attention: [P] float class attention of each patch's token in this block (NaN where the
            patch was already discarded), or None.
        patch_pruned: [P] bool, patches whose token was pruned and sent into another token here, or None.
        patch_weight: [P] float, each patch's token's share of its destination token, or None.
        edges: [M, 3] float (patch, token, share): further destinations of patches whose token went
            into several tokens (see `Stage.patch_edges`), or None.
        note: the method's text about this image's decision at this stage, or None.
    """

    layer: int
    patch_to_token: np.ndarray
    token_kinds: tuple[str, ...]
    token_sizes: np.ndarray
    cls_attention: np.ndarray | None = None
    patch_pruned: np.ndarray | None = None
    patch_weight: np.ndarray | None = None
    edges: np.ndarray | None = None
    note: str | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.token_kinds)

    @property
    def squeezes(self) -> bool:
        """True when pruned tokens were squeezed into host tokens at this stage (TPS dispatch)."""
        return _squeezes(self.patch_pruned, "host" in self.token_kinds)

    @classmethod
    def from_stage(cls, stage: Stage, index: int = 0) -> "StageRecord":
        """Image `index` of a batched `Stage`."""

        def arr(value):
            if value is None:
                return None
            value = value[index].detach()
            return value.float().cpu().numpy() if value.dtype.is_floating_point else value.cpu().numpy()

        edges = None
        if stage.patch_edges is not None:
            patch, token, share = (part[index].detach().cpu() for part in stage.patch_edges)
            used = patch >= 0
            edges = np.stack([patch[used].double().numpy(), token[used].double().numpy(), share[used].double().numpy()], axis=1)
        n_out = stage.image_tokens(index)
        return cls(
            layer=int(stage.layer),
            patch_to_token=arr(stage.patch_to_token).astype(np.int64),
            token_kinds=tuple(stage.kind_names(index)),
            token_sizes=arr(stage.token_sizes).astype(np.int64)[:n_out],
            cls_attention=arr(stage.cls_attention),
            patch_pruned=None if stage.patch_pruned is None else arr(stage.patch_pruned).astype(bool),
            patch_weight=arr(stage.patch_weight),
            edges=edges,
            note=None if stage.notes is None else stage.notes[index],
        )

    def to_json(self) -> dict[str, Any]:
        """The `stages` entry of `inspect --json` (README): layer, patch_to_token, token_sizes,
        token_kinds, and for a squeezing stage `dispatch`, one `{patch, host_token, weight}` per
        pruned patch (weight rounded to 6 decimals)."""
        record: dict[str, Any] = {
            "layer": self.layer,
            "patch_to_token": self.patch_to_token.tolist(),
            "token_sizes": self.token_sizes.tolist(),
            "token_kinds": list(self.token_kinds),
        }
        if self.note is not None:
            record["note"] = self.note
        if self.squeezes:
            others = self.other_hosts()
            entries = []
            for p in np.flatnonzero(self.patch_pruned).tolist():
                entry = {"patch": p, "host_token": int(self.patch_to_token[p]), "weight": round(float(self.patch_weight[p]), 6)}
                if p in others:  # squeezed into several (tied) hosts: all of them, the first one included
                    entry["hosts"] = [{"token": entry["host_token"], "weight": entry["weight"]}] + [
                        {"token": token, "weight": round(weight, 6)} for token, weight in others[p]]
                entries.append(entry)
            record["dispatch"] = entries
        return record

    def other_hosts(self) -> dict[int, list[tuple[int, float]]]:
        """For each patch whose token also went into tokens other than the one holding it, those
        (token, share) pairs (from `edges`)."""
        out: dict[int, list[tuple[int, float]]] = {}
        if self.edges is not None:
            for patch, token, share in self.edges.tolist():
                out.setdefault(int(patch), []).append((int(token), float(share)))
        return out

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "StageRecord":
        """From one `stages` entry of `inspect --json` (its dispatch list gives pruned patches and weights)."""
        p2t = np.asarray(record["patch_to_token"], dtype=np.int64)
        pruned = weight = edges = None
        if "dispatch" in record:
            pruned = np.zeros(p2t.shape, dtype=bool)
            weight = np.full(p2t.shape, np.nan)
            extra = []
            for item in record["dispatch"]:
                pruned[item["patch"]] = True
                weight[item["patch"]] = item["weight"]
                extra += [(item["patch"], host["token"], host["weight"]) for host in item.get("hosts", [])[1:]]
            edges = np.asarray(extra, dtype=np.float64).reshape(-1, 3) if extra else None
        return cls(layer=int(record["layer"]), patch_to_token=p2t, token_kinds=tuple(record["token_kinds"]),
                   token_sizes=np.asarray(record["token_sizes"], dtype=np.int64), patch_pruned=pruned, patch_weight=weight,
                   edges=edges, note=record.get("note"))
