"""Pretraining methods; importing this package registers them all.

Every module in this package is imported here, so a new method file registers itself
(``@register_method``) with no edit elsewhere, as timm's ``@register_model`` does.
"""

import importlib
import pkgutil

from sslcli.methods.base import METHODS, Method, StepOutput, build_method, get_method, register_method

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "Method", "StepOutput", "build_method", "get_method", "register_method"]
