"""One image (or a few) through a reduction plan: the per-image analysis that both `inspect` (CLI)
and the app's main page show, as plain values (numpy arrays and Python numbers).

`analyse_images` runs the reduced model once over the batch (provenance tracked, block outputs
kept) and, on request, the dense model once, and returns one `ImageAnalysis` per image:
predictions, token counts, per-stage provenance (`StageRecord`), GMACs and the block outputs from
which the diversity r(Z) is computed on demand. `ImageAnalysis.to_json` is the `inspect --json`
record (README, "a public interface").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .diversity import diversity_of_blocks
from .engine import Result, run
from .gmacs import gmacs_report
from .models import LoadedModel, data_config, imagenet_labels, preprocess
from .plan import ReductionPlan
from .provenance import StageRecord


def top_k(logits: torch.Tensor, k: int = 5) -> list[list[dict[str, Any]]]:
    """Per image, the k most probable ImageNet classes as {index, label, prob} (prob in [0, 1])."""
    labels = imagenet_labels() if logits.shape[1] == 1000 else None
    probs = logits.float().softmax(dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    return [
        [
            {"index": int(i), "label": labels[int(i)] if labels else f"class {int(i)}", "prob": round(float(p), 6)}
            for p, i in zip(row_p.tolist(), row_i.tolist())
        ]
        for row_p, row_i in zip(values, indices)
    ]


@dataclass
class ImageAnalysis:
    """One image through one ReductionPlan, reduced to what the CLI prints and the app draws.

    Attributes:
        plan: the plan that ran.
        token_counts: tokens (cls included) leaving each block.
        stages: one `StageRecord` per reduction stage (provenance, methods.md §7).
        top5: the 5 most probable ImageNet classes as {index, label, prob}.
        dense_top5: the same for the dense model, when it was run (else None).
        gmacs: `gmacs_report` of the plan with the observed token counts: {"gmacs", "dense_gmacs",
            "reduction_pct"}, GMACs per image.
        block_outputs: per block, the [N_i, C] float32 tokens leaving it, cls token at index 0.
        block_sizes: per block, the [N_i] patches held by each token (cls included).
        num_prefix_tokens: the tokens before the patches in the block outputs (left out of r(Z)).
    """

    plan: ReductionPlan
    token_counts: list[int]
    stages: list[StageRecord]
    top5: list[dict[str, Any]]
    gmacs: dict[str, float]
    block_outputs: list[np.ndarray]
    block_sizes: list[np.ndarray]
    dense_top5: list[dict[str, Any]] | None = None
    num_prefix_tokens: int = 1

    def diversity(self, centre: str = "medoid", size_weighted: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(raw, per-token) r(Z) of each block's output (methods.md §5), each [depth] float64, by
        `analysis.diversity.diversity_of_blocks` on the stored block outputs.

        Args:
            centre: "medoid" (one of the tokens, BAT's definition) or "median" (free centre).
            size_weighted: a token counts once per patch it holds; per-token values then divide by
                the total size instead of the number of non-cls tokens.
        Raises:
            ValueError: an unknown centre.
        """
        outputs = [torch.from_numpy(output).unsqueeze(0) for output in self.block_outputs]
        sizes = [torch.from_numpy(size).unsqueeze(0) for size in self.block_sizes]
        raw, per_token = diversity_of_blocks(outputs, sizes, centre, bool(size_weighted), self.num_prefix_tokens)
        return raw[0], per_token[0]

    def to_json(self, file: str, loaded: LoadedModel, crop_pct: float) -> dict[str, Any]:
        """The `inspect --json` record of this image (README: one object per image)."""
        return {
            "file": file,
            "model": loaded.name,
            "weights": loaded.weights_label,
            "method": self.plan.method,
            "params": self.plan.resolved(len(loaded.model.blocks)),
            "device": loaded.device,
            "crop_pct": crop_pct,
            "token_counts": self.token_counts,
            "stages": [stage.to_json() for stage in self.stages],
            "top5": self.top5,
            "dense_top5": self.dense_top5,
            "diversity": [round(float(value), 6) for value in self.diversity()[0]],
            "gmacs": round(self.gmacs["gmacs"], 6),
            "dense_gmacs": round(self.gmacs["dense_gmacs"], 6),
        }


def analyse_result(result: Result, index: int, gmacs: dict[str, float], dense_top5: list | None = None,
                   top5: list | None = None) -> ImageAnalysis:
    """The analysis of image `index` of an engine `Result` run with keep_block_outputs=True.

    Raises ValueError when the result holds no block outputs."""
    if result.block_outputs is None:
        raise ValueError("the result has no block outputs: run the engine with keep_block_outputs=True")
    counts = result.image_token_counts[index].tolist() if result.image_token_counts is not None else list(result.token_counts)
    return ImageAnalysis(
        plan=result.plan,
        token_counts=counts,
        stages=[StageRecord.from_stage(stage, index) for stage in result.stages],
        top5=top5 if top5 is not None else top_k(result.logits[index:index + 1], 5)[0],
        gmacs=gmacs,
        block_outputs=[output[index, :count].detach().float().cpu().numpy() for output, count in zip(result.block_outputs, counts)],
        block_sizes=[sizes[index, :count].detach().cpu().numpy() for sizes, count in zip(result.block_sizes, counts)],
        dense_top5=dense_top5,
        num_prefix_tokens=result.num_prefix_tokens,
    )


def analyse_images(loaded: LoadedModel, images: list, plan: ReductionPlan, crop_pct: float | None = None,
                   dense: bool = True) -> list[ImageAnalysis]:
    """Preprocess PIL images with the model's data config, run `plan` once over the batch (and the
    dense model once, if `dense`), and return one `ImageAnalysis` per image.

    Raises PlanError when the plan does not fit the model or the method cannot run.
    """
    batch = preprocess(images, loaded.model, crop_pct).to(loaded.device)
    reduced = run(loaded.model, batch, plan, extras=loaded.extras, keep_block_outputs=True)
    dense_top5 = None
    if dense:
        dense_logits = reduced.logits if plan.is_dense else run(loaded.model, batch, ReductionPlan(), track=False).logits
        dense_top5 = top_k(dense_logits, 5)
    top5 = top_k(reduced.logits, 5)
    costs: dict[tuple[int, ...], dict[str, float]] = {}  # GMACs from each image's own token counts
    analyses = []
    for index in range(len(images)):
        counts = tuple(reduced.image_token_counts[index].tolist())
        if counts not in costs:
            costs[counts] = gmacs_report(loaded.model, plan, loaded.extras, list(counts))
        analyses.append(analyse_result(reduced, index, costs[counts], dense_top5[index] if dense_top5 else None, top5[index]))
    return analyses


def crop_pct_used(loaded: LoadedModel, crop_pct: float | None) -> float:
    """The centre-crop fraction a run uses: `crop_pct`, else the model's timm data config's."""
    return data_config(loaded.model, crop_pct)["crop_pct"]
