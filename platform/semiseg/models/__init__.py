"""Segmentation networks, registered by name (see :mod:`semiseg.models.registry`)."""

from semiseg.models.registry import MODELS, build_model, register_model

__all__ = ["MODELS", "build_model", "register_model"]
