"""One image (or a few) through the dense and the reduced model: predictions, token counts and
provenance, as plain records the CLI prints and the app draws."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .engine import ReductionPlan, Result, run
from .models import LoadedModel, imagenet_labels, preprocess


@dataclass
class Inspection:
    """A reduced and a dense forward pass over the same batch.

    Attributes:
        images: [B, 3, H, W] the normalised model input (CPU).
        reduced: the reduced run (provenance tracked, block outputs kept).
        dense: the dense run of the same input.
    """

    images: torch.Tensor
    reduced: Result
    dense: Result


def inspect_batch(loaded: LoadedModel, images: list, plan: ReductionPlan, crop_pct: float | None = None) -> Inspection:
    """Preprocess PIL images with the model's data config and run the dense and the reduced model.

    Raises PlanError when the plan does not fit the model.
    """
    batch = preprocess(images, loaded.model, crop_pct)
    device_batch = batch.to(loaded.device)
    reduced = run(loaded.model, device_batch, plan, extras=loaded.extras, keep_block_outputs=True)
    dense = reduced if plan.is_dense else run(loaded.model, device_batch, ReductionPlan(), track=False)
    return Inspection(images=batch, reduced=reduced, dense=dense)


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


def stage_records(result: Result, index: int) -> list[dict[str, Any]]:
    """The JSON records of image `index`'s stages: layer, patch_to_token, token_sizes, token_kinds,
    plus `dispatch` for methods that squeeze pruned tokens into hosts."""
    records = []
    for stage in result.stages:
        record: dict[str, Any] = {
            "layer": stage.layer,
            "patch_to_token": stage.patch_to_token[index].tolist(),
            "token_sizes": stage.token_sizes[index].tolist(),
            "token_kinds": stage.kind_names(index),
        }
        if "dispatch" in stage.extra and stage.patch_pruned is not None:
            pruned = stage.patch_pruned[index].nonzero().flatten().tolist()
            hosts = stage.patch_to_token[index]
            weights = stage.patch_weight[index]
            record["dispatch"] = [
                {"patch": p, "host_token": int(hosts[p]), "weight": round(float(weights[p]), 6)} for p in pruned
            ]
        records.append(record)
    return records


def plan_params(plan: ReductionPlan, depth: int) -> dict[str, Any]:
    """The plan as the JSON `params` object: keep_rate, layers and the method's parameters."""
    if plan.is_dense:
        return {}
    params: dict[str, Any] = {"keep_rate": plan.keep_rate, "layers": list(plan.reducing_layers(depth))}
    for name, value in plan.param_dict().items():
        params[name] = list(value) if isinstance(value, tuple) else value
    return params
