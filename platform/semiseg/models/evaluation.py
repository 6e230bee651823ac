"""The evaluation network of a trained method, rebuilt from the description saved with its checkpoint.

A checkpoint's ``model_spec`` (written by :func:`semiseg.train.build.model_spec`) names the
architecture (``model``), the data's shape (``dims``, ``in_channels``, ``num_classes``) and,
for a method whose evaluation network is more than one segmenter, its structure: for
multi-view co-training ``ensemble_views = K`` (the K views' networks averaged by
:class:`semiseg.components.views.ViewEnsemble`). The model registry and prediction rebuild
the network with :func:`build_evaluation_network` and load the checkpoint's best weights.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from semiseg.components.views import ViewEnsemble
from semiseg.models.registry import build_model

ENSEMBLE_VIEWS = "ensemble_views"
"""Spec key: the evaluation network is a :class:`ViewEnsemble` of this many segmenters."""


def build_segmenter(spec: Mapping[str, Any]) -> nn.Module:
    """One segmentation network as ``spec`` describes it (untrained)."""
    model = spec["model"]
    return build_model(model["name"], dims=int(spec["dims"]), in_channels=int(spec["in_channels"]),
                       num_classes=int(spec["num_classes"]), depth=int(model["depth"]), width=int(model["width"]),
                       dropout=float(model["dropout"]), norm=str(model["norm"]))


def build_evaluation_network(spec: Mapping[str, Any]) -> nn.Module:
    """The (untrained) evaluation network ``spec`` describes: one segmenter, or the view ensemble of
    ``spec["ensemble_views"]`` segmenters; load the checkpoint's ``best_eval_state`` into it."""
    views = int(spec.get(ENSEMBLE_VIEWS, 0))
    if views:
        return ViewEnsemble([build_segmenter(spec) for _ in range(views)], int(spec["dims"]))
    return build_segmenter(spec)
