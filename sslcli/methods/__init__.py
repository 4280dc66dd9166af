"""Pretraining methods; importing this package registers them all."""

from sslcli.methods import mocov2, simclr  # noqa: F401
from sslcli.methods.base import METHODS, Method, StepOutput, build_method, get_method, register_method

__all__ = ["METHODS", "Method", "StepOutput", "build_method", "get_method", "register_method"]
