"""Injected failures for the resume tests: a training step that crashes once, mid-run."""

from __future__ import annotations

from typing import Any

import pytest

from sslcli.engine import train as train_module


def crash_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Makes the loop's ``step``-th ``forward_backward`` call raise ``RuntimeError("simulated crash in step
    N")``; the calls before it train as usual.  ``monkeypatch.undo()`` (or the test's end) restores it."""
    real = train_module.forward_backward
    calls = {"n": 0}

    def crashing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == step:
            raise RuntimeError(f"simulated crash in step {step}")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "forward_backward", crashing)
