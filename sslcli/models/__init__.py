"""Backbones (timm) and heads."""
