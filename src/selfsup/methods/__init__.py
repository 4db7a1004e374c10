"""Methods: one file each, registered by name."""

from selfsup.methods import mocov2, simclr  # noqa: F401  (registration)
from selfsup.methods import barlow_twins, byol, simsiam  # noqa: F401  (registration)
from selfsup.methods import instdisc, invaspread, mocov1, supcon, supervised  # noqa: F401
from selfsup.methods import mocov3, swav  # noqa: F401  (registration)
from selfsup.methods import dino  # noqa: F401  (registration)
from selfsup.methods import cmc  # noqa: F401  (registration)
from selfsup.methods import cpc  # noqa: F401  (registration)
from selfsup.methods import simclrv2  # noqa: F401  (registration)
from selfsup.methods import pixpro  # noqa: F401  (registration)
from selfsup.methods.base import (METHODS, Batch, Method, MethodContext, StepOutput,
                                  build_method, get_method_class, method_hyperparameters,
                                  method_names, register_method, validate_hyperparameters)

__all__ = ["METHODS", "Batch", "Method", "MethodContext", "StepOutput", "build_method",
           "get_method_class", "method_hyperparameters", "method_names", "register_method",
           "validate_hyperparameters"]
