"""Every registered method's step compiles into whole graphs that training does not recompile.

``pretrain --compile`` compiles the method's forward. A graph break splits the step (no fusion across it,
and a ``.item()`` behind one is a host sync per step); a recompile per step (a Python float read in
``forward`` that a schedule changes, a queue pointer read on the host) costs a compilation per step until
dynamo gives up and runs the step eagerly. Both are decided by dynamo's tracing alone, so the step is
compiled with ``backend="eager"``: the test sees what inductor would be handed, in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

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
from sslcli.methods.base import build_method
from sslcli.models.dvae import DiscreteVAE, save_tokenizer
from sslcli.runs import run_encoder

get_method("simclr")  # populate the registry before parametrisation

# Graph breaks that stay, each around host-side work that has no tensor form: BEiT's blockwise masks and
# CLIP's BPE tokenizer are Python loops run eagerly (`torch.compiler.disable`); InstDisc reads its
# partition-function estimate once, at the first step (a second trace, then none).
EXPECTED_BREAKS = {"beit": 1, "clip": 1, "instdisc": 2}


def untrained_tokenizer(directory: Path) -> str:
    """beit's prerequisite at the dvae small recipe's layout; tracing does not care that it is untrained."""
    cfg = build_config("dvae", "small", {})
    args = cfg.method_args
    tokenizer = DiscreteVAE(args["vocab"], args["code_dim"], tuple(args["widths"]))
    meta = {"image_size": str(cfg.augment.eval_size), "mean": json.dumps(list(cfg.augment.mean)),
            "std": json.dumps(list(cfg.augment.std))}
    save_tokenizer(tokenizer, directory / "tokenizer.safetensors", meta)
    return str(directory)


# Options the small recipes leave off: SwAV's queue (here full after the first step).
VARIANTS = {"swav-queue": ("swav", ["method_args.queue_length=8", "method_args.queue_start_epoch=0"])}


@pytest.mark.parametrize("case", [*sorted(METHODS), *VARIANTS])
def test_a_compiled_step_keeps_whole_graphs_and_never_recompiles(case: str, synth_data: Path,
                                                                   tmp_path: Path) -> None:
    name, sets = VARIANTS.get(case, (case, []))
    if name == "beit":
        sets = [f"method_args.tokenizer={untrained_tokenizer(tmp_path)}"]
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
    total = 1000

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(method, backend="eager")

    def train_step(step: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = forward_backward(compiled, views, batch, scaler, torch.device("cpu"), None, 1)
        guarded_update(method, optimizer, scaler, guard, loss, None, False, step, total)

    for step in (0, 1):  # the first traces (and any one-off work of the first step)
        train_step(step)
    breaks = sum(counters["graph_break"].values())
    assert breaks == EXPECTED_BREAKS.get(name, 0), dict(counters["graph_break"])
    counters.clear()
    # Later steps at other points of the schedules (DINO's teacher temperature is still warming up at 2%).
    for step in (2, 20, 500, 900):
        train_step(step)
    assert not counters["stats"].get("unique_graphs"), f"{name}: a later step compiled again"
    assert not counters["graph_break"]
