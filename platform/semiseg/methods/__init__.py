"""Semi-supervised methods, one file each, registered under the file's name."""

from semiseg.methods.base import BuildContext, HParam, Method, MethodParams, Progress, StepOutput, hparam
from semiseg.methods.registry import build_method, get_method, method_defaults, method_names, method_params

__all__ = ["BuildContext", "HParam", "Method", "MethodParams", "Progress", "StepOutput", "build_method",
           "get_method", "hparam", "method_defaults", "method_names", "method_params"]
