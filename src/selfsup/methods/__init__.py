"""Methods: one file each, registered by name."""

from selfsup.methods import mocov2, simclr  # noqa: F401  (registration)
from selfsup.methods.base import (METHODS, Batch, Method, MethodContext, StepOutput,
                                  build_method, get_method_class, method_hyperparameters,
                                  method_names, register_method, validate_hyperparameters)

__all__ = ["METHODS", "Batch", "Method", "MethodContext", "StepOutput", "build_method",
           "get_method_class", "method_hyperparameters", "method_names", "register_method",
           "validate_hyperparameters"]
