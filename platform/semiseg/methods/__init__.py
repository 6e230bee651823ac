"""Semi-supervised methods, one file each, registered under the file's name."""

from semiseg.methods.base import BuildContext, HParam, Method, Progress, StepOutput
from semiseg.methods.registry import build_method, get_method, method_defaults, method_names

__all__ = ["BuildContext", "HParam", "Method", "Progress", "StepOutput", "build_method",
           "get_method", "method_defaults", "method_names"]
