"""Every registered method's step is fit for a GPU: compiled, it keeps whole graphs that training does not
recompile; eager, it reads one tensor on the host per step.

``pretrain --compile`` compiles the method's forward. A graph break splits the step (no fusion across it,
and a ``.item()`` behind one is a host sync per step); a recompile per step (a Python float read in
``forward`` that a schedule changes, a queue pointer read on the host) costs a compilation per step until
dynamo gives up and runs the step eagerly. Both are decided by dynamo's tracing alone, so the step is
compiled with ``backend="eager"``: the test sees what inductor would be handed, in seconds. Host reads
(``.item()``, ``bool(t)``, ...) are counted by wrapping the tensor methods that make them.
"""

from __future__ import annotations

import os
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from sslcli.augment import MultiView, eval_transform
from sslcli.config import build_config
from sslcli.data.loader import build_loader
from sslcli.data.reader import resolve_source
from sslcli.engine.guards import StepGuard
from sslcli.engine.optim import build_optimizer
from sslcli.engine.precision import grad_scaler
from sslcli.engine.step import forward_backward, guarded_update
from sslcli.evaluation.features import extract_features
from sslcli.methods import METHODS, get_method
from sslcli.methods.base import Method, build_method
from sslcli.runs import run_encoder

get_method("simclr")  # populate the registry before parametrisation

# Graph breaks that stay, each around host-side work that has no tensor form: BEiT's blockwise masks and
# CLIP's BPE tokenizer are Python loops run eagerly (`torch.compiler.disable`).
EXPECTED_BREAKS = {"beit": 1, "clip": 1}


# Options the small recipes leave off: SwAV's queue (here full after the first step), and DINO's teacher
# temperature warming up over the whole run, so that it changes at every step.
VARIANTS = {"swav-queue": ("swav", ["method_args.queue_length=8", "method_args.queue_start_epoch=0"]),
            "dino-warmup": ("dino", ["method_args.warmup_teacher_temp=0.01",
                                     "method_args.warmup_teacher_temp_epochs=6"])}


Step = Callable[[torch.nn.Module, int], None]


def training_step(case: str, synth_data: Path, request: pytest.FixtureRequest) -> tuple[Method, Step]:
    """The case's method (small recipe, batch 8, one real batch's views) and ``step(model, i)``: the loop's
    forward/backward through ``model`` (the method or its compiled wrapper) and guarded update, as step ``i``
    of a 1000-step run."""
    name, sets = VARIANTS.get(case, (case, []))
    if name == "beit":
        sets = [f"method_args.tokenizer={request.getfixturevalue('tokenizer_run')}"]
    cfg = build_config(name, "small", {"data": str(synth_data), "batch_size": 8, "num_workers": 0}, sets)
    source = resolve_source(cfg.data, "train")
    torch.manual_seed(0)
    method = build_method(cfg.method, run_encoder(cfg), cfg.method_args, num_samples=source.num_samples,
                          augment=cfg.augment, epochs=cfg.epochs)
    aug = cfg.augment
    method.before_epoch(0, lambda module: extract_features(  # DeepCluster's clustering, as the loop runs it
        module, source, eval_transform(aug.eval_size, aug.eval_crop_pct, aug.mean, aug.std), batch_size=64,
        device=torch.device("cpu"), num_workers=0)[0])
    method.train()
    batch = next(iter(build_loader(source, MultiView(aug, method.extra_fields()), batch_size=8, shuffle=True,
                                   num_workers=0, drop_last=True, options=cfg.loader)))
    views = batch.pop("views")
    optimizer = build_optimizer(method.param_groups(), cfg.optim, cfg.optim.scaled_lr(cfg.batch_size))
    scaler, guard = grad_scaler(torch.device("cpu"), None), StepGuard(cfg.max_bad_steps)

    def step(model: torch.nn.Module, i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = forward_backward(model, views, batch, scaler, torch.device("cpu"), None, 1)
        guarded_update(method, optimizer, scaler, guard, loss, None, False, i, 1000)

    return method, step


CASES = [*sorted(METHODS), *VARIANTS]
# Host-side by design: BEiT's masks come from a CPU generator (engine/masking.py, BEiT.sample_masks).
HOST_SIDE = ("sample_masks", "blockwise_mask", "uniform")
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.mark.parametrize("case", CASES)
def test_a_step_reads_the_host_once_and_compiles_to_graphs_that_last(case: str, synth_data: Path,
                                                                      request: pytest.FixtureRequest,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager, a steady-state step (hooks included) reads one tensor's value on the host, the non-finite
    guard's flags, which decide whether the optimiser steps: on a GPU each such read waits for the device.
    Compiled, it has no graph break but the expected ones, and later steps compile nothing new."""
    method, step = training_step(case, synth_data, request)
    for i in (0, 1):  # one-off reads of the first steps (InstDisc's partition function, SwAV's queue filling)
        step(method, i)
    reads: Counter[str] = Counter()

    def counted(name: str) -> Callable[..., Any]:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            frames = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}sslcli{os.sep}" in f.filename]
            if frames and not any(f.name in HOST_SIDE for f in frames):
                reads[f"{Path(frames[-1].filename).name}:{frames[-1].lineno} ({name})"] += 1
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    for i in (2, 3, 4):
        step(method, i)
    monkeypatch.undo()
    (site, count), *others = reads.most_common()
    assert site.startswith("guards.py:") and count == 3 and not others, f"host reads in 3 steps: {dict(reads)}"

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(method, backend="eager")
    for i in (5, 6):  # the first traces
        step(compiled, i)
    assert sum(counters["graph_break"].values()) == EXPECTED_BREAKS.get(method.name, 0), dict(counters["graph_break"])
    counters.clear()
    for i in (20, 500, 900):  # later points of the schedules
        step(compiled, i)
    assert not counters["stats"].get("unique_graphs"), f"{case}: a later step compiled again"
    assert not counters["graph_break"]
