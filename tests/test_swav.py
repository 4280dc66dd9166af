"""SwAV: Sinkhorn-Knopp codes, the swapped-prediction loss, the method's prototypes and queue, 2 ranks = 1 rank."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sslcli.config import build_config
from sslcli.engine.optim import OptimConfig, build_optimizer
from sslcli.engine.sinkhorn import sinkhorn
from sslcli.errors import UserError
from sslcli.losses import swav_loss
from sslcli.methods import build_method
from sslcli.models.encoders import create_encoder

from dist_launch import run_single, torchrun

TINY = {"proj_hidden": 32, "proj_dim": 16, "num_prototypes": 10}


def _scores(b: int = 12, k: int = 5, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(b, 16, generator=torch.Generator().manual_seed(seed)), dim=1) @ F.normalize(
        torch.randn(k, 16, generator=torch.Generator().manual_seed(seed + 1)), dim=1).T


def test_sinkhorn_codes_sum_to_one_and_prototype_totals_converge_to_b_over_k() -> None:
    scores = _scores()
    b, k = scores.shape
    q = sinkhorn(scores, epsilon=0.05, iterations=3)
    assert q.shape == (b, k) and q.dtype == torch.float32 and (q >= 0).all()
    # The last normalisation is over each sample: exact.
    torch.testing.assert_close(q.sum(dim=1), torch.ones(b), rtol=0, atol=1e-6)
    # Prototype totals are B/K only as far as the iterations converged: closer than the plain softmax's, and
    # exact in the limit.
    softmax_gap = ((scores / 0.05).softmax(dim=1).sum(dim=0) - b / k).abs().max()
    assert (q.sum(dim=0) - b / k).abs().max() < softmax_gap
    converged = sinkhorn(scores, epsilon=0.05, iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((k,), b / k), rtol=0, atol=1e-4)


def _reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Scaling vectors u, v of Diag(u) P Diag(v) (Cuturi 2013), explicit loops in float64."""
    p = torch.exp(scores.double() / epsilon)  # [B, K]
    b, k = p.shape
    u, v = [1.0] * k, [1.0] * b
    for _ in range(iterations):
        u = [(1 / k) / sum(p[i, j].item() * v[i] for i in range(b)) for j in range(k)]
        v = [(1 / b) / sum(p[i, j].item() * u[j] for j in range(k)) for i in range(b)]
    q = torch.tensor([[p[i, j].item() * u[j] * v[i] * b for j in range(k)] for i in range(b)])
    return q.float()


@pytest.mark.parametrize(("epsilon", "iterations"), [(0.05, 3), (0.5, 1), (0.1, 10)])
def test_sinkhorn_matches_a_reference_loop(epsilon: float, iterations: int) -> None:
    scores = _scores(7, 4, seed=3)
    torch.testing.assert_close(sinkhorn(scores, epsilon, iterations), _reference_sinkhorn(scores, epsilon, iterations),
                               rtol=1e-4, atol=1e-6)


def test_sinkhorn_is_float32_for_low_precision_input_and_does_not_overflow() -> None:
    scores = _scores().bfloat16()
    q = sinkhorn(scores)
    assert q.dtype == torch.float32
    torch.testing.assert_close(q, sinkhorn(scores.float()))
    # exp(5 / 0.05) overflows float32; a shift shared by all scores cancels, so the codes do not change.
    torch.testing.assert_close(sinkhorn(_scores() + 4.0, epsilon=0.05), sinkhorn(_scores(), epsilon=0.05))


def _reference_swav_loss(scores: list[torch.Tensor], codes: list[torch.Tensor], tau: float) -> float:
    pairs = []
    for s, q in enumerate(codes):
        for t, z in enumerate(scores):
            if t == s:
                continue
            total = 0.0
            for i in range(z.shape[0]):
                norm = math.log(sum(math.exp(x / tau) for x in z[i].tolist()))
                total -= sum(q[i, k].item() * (z[i, k].item() / tau - norm) for k in range(z.shape[1]))
            pairs.append(total / z.shape[0])
    # every (code crop, other crop) pair has the same weight: the mean over t, then over s
    return sum(pairs) / len(pairs)


def test_swav_loss_matches_a_reference_loop_over_code_and_prediction_crops() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(5, 7, generator=g).clamp(-1, 1) for _ in range(5)]  # 2 global + 3 local crops
    codes = [torch.rand(5, 7, generator=g).softmax(dim=1) for _ in range(2)]
    assert swav_loss(scores, codes, 0.1).item() == pytest.approx(_reference_swav_loss(scores, codes, 0.1), rel=1e-5)
    # Two crops: the paper's (l(z1, q2) + l(z2, q1)) / 2.
    l12 = -(codes[1] * F.log_softmax(scores[0] / 0.1, dim=1)).sum(dim=1).mean()
    l21 = -(codes[0] * F.log_softmax(scores[1] / 0.1, dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(swav_loss(scores[:2], codes, 0.1), (l12 + l21) / 2)


def test_swav_loss_sends_no_gradient_to_the_codes() -> None:
    scores = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    codes = [torch.rand(4, 3).softmax(dim=1).requires_grad_() for _ in range(2)]
    swav_loss(scores, codes, 0.1).backward()
    assert all(s.grad is not None for s in scores)
    assert codes[0].grad is None and codes[1].grad is None


def _swav(**kwargs: object):  # noqa: ANN202
    torch.manual_seed(0)
    runtime = {k: kwargs.pop(k) for k in ("augment", "epochs") if k in kwargs}
    return build_method("swav", create_encoder("resnet18"), {**TINY, **kwargs}, **runtime)


def _crops(b: int = 6, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(b, 3, 16, 16, generator=g)
                                                                         for _ in range(3)]


def test_step_encodes_once_per_resolution_and_takes_codes_from_the_global_crops_only() -> None:
    method = _swav().eval()  # eval-mode BN: one call per group equals one call per crop
    with torch.no_grad():
        method.prototypes.weight.mul_(3.0)  # normalised again before the step
    calls: list[int] = []
    method.backbone.register_forward_hook(lambda _m, inp, _out: calls.append(inp[0].shape[0]))
    views = _crops()
    out = method(views, {})
    assert calls == [12, 18]  # 2 x 32 px, then 3 x 16 px
    torch.testing.assert_close(method.prototypes.weight.norm(dim=1), torch.ones(10))
    with torch.no_grad():
        z = [F.normalize(method.projector(method.backbone(v)), dim=1) for v in views]
        scores = [zi @ method.prototypes.weight.T for zi in z]
        expected = swav_loss(scores, [sinkhorn(s, 0.05, 3) for s in scores[:2]], 0.1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.embedding, z[0], rtol=1e-4, atol=1e-5)
    assert 0 < out.logs["teacher_entropy"] <= math.log(10) and 0 < out.logs["student_entropy"] <= math.log(10)


def test_prototypes_are_frozen_during_the_first_epoch_only() -> None:
    method = _swav(freeze_prototypes_epochs=1.0, epochs=4)
    optimizer = build_optimizer(method.param_groups(), OptimConfig(name="lars", lr=0.5, weight_decay=1e-4), 0.5)
    for progress, frozen in [(0.0, True), (0.24, True), (0.25, False)]:
        method(_crops(), {}).loss.backward()
        before = method.prototypes.weight.detach().clone()
        head_before = method.projector[0].weight.detach().clone()
        method.before_optimizer_step(progress)  # epoch = progress x 4
        assert (method.prototypes.weight.grad is None) == frozen
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert torch.equal(method.prototypes.weight, before) == frozen  # not even weight decay moves them
        assert not torch.equal(method.projector[0].weight, head_before)


def test_queue_fills_from_its_start_epoch_and_joins_sinkhorn_once_full() -> None:
    method = _swav(queue_length=12, queue_start_epoch=2, epochs=10).eval()
    method(_crops(), {})
    assert int(method.queued) == 0  # epoch 0 < 2: not filling yet
    method.after_step(0.2)  # epoch 2
    initial = method.queues[1].keys.clone()
    for step in range(2):  # 2 x 6 embeddings: full after the second step, unused until then
        views = _crops(seed=step)
        out = method(views, {})
        assert int(method.queued) == 6 * (step + 1)
        with torch.no_grad():
            z = [F.normalize(method.projector(method.backbone(v)), dim=1) for v in views]
            scores = [zi @ method.prototypes.weight.T for zi in z]
        torch.testing.assert_close(out.loss, swav_loss(scores, [sinkhorn(s) for s in scores[:2]], 0.1), rtol=1e-4,
                                   atol=1e-5)
        method.after_step(0.2)  # as the loop does: the host learns that the queue is full
    assert not torch.equal(method.queues[1].keys, initial)
    queued = [q.keys.clone() for q in method.queues]
    views = _crops(seed=9)
    with torch.no_grad():
        z = [F.normalize(method.projector(method.backbone(v)), dim=1) for v in views]
        scores = [zi @ method.prototypes.weight.T for zi in z]
    out = method(views, {})  # full: each global crop's queue is prepended, then dropped from the codes
    codes = [sinkhorn(torch.cat([k @ method.prototypes.weight.T, s]))[-6:] for k, s in zip(queued, scores[:2])]
    torch.testing.assert_close(out.loss, swav_loss(scores, codes, 0.1), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out.loss, swav_loss(scores, [sinkhorn(s) for s in scores[:2]], 0.1))
    resumed = _swav(queue_length=12, queue_start_epoch=2, epochs=10)
    assert not resumed.queue_full
    resumed.load_state_dict(method.state_dict())  # --resume: the host flags follow the loaded counters
    assert resumed.queue_filling and resumed.queue_full


def test_a_single_crop_is_a_user_error() -> None:
    cfg = build_config("swav", "small", sets=["augment.views=[{count: 1, size: 32}]"])
    with pytest.raises(UserError, match="at least 2 crops"):
        build_method("swav", create_encoder("resnet18"), cfg.method_args, augment=cfg.augment, epochs=1)


def test_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_single("swav_equivalence.py", str(one))
    torchrun("swav_equivalence.py", str(two))
    a, b = torch.load(one), torch.load(two)
    assert a["world"] == 1 and b["world"] == 2
    # Q of the global batch split over 2 ranks = Q of the whole batch in one process.
    torch.testing.assert_close(b["codes"], a["codes"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b["loss"], a["loss"], rtol=1e-5, atol=1e-6)
    assert a["grads"].keys() == b["grads"].keys() and "prototypes.weight" in a["grads"]
    for key in a["grads"]:
        torch.testing.assert_close(b["grads"][key], a["grads"][key], rtol=1e-4, atol=1e-6, msg=key)
    torch.testing.assert_close(b["queue"], a["queue"])  # every rank enqueues the gathered global batch


def test_seer_is_a_recipe_of_swav() -> None:
    paper, small = build_config("seer"), build_config("seer", "small")
    assert paper.method == small.method == "swav"
    assert paper.arch == "regnety_2560" and small.arch == "regnety_008" and small.method_args["proj_norm"] == "bn"
    assert paper.method_args["sinkhorn_iterations"] == 10 and paper.method_args["num_prototypes"] == 16000
    assert paper.method_args["proj_norm"] is None and [v.count for v in paper.augment.views] == [2, 4]
    with pytest.raises(UserError, match="did you mean: seer"):
        build_config("seerr")


def test_seer_small_trains_a_regnet(synth_data: Path, tmp_path: Path) -> None:
    from sslcli.pretrain import pretrain

    cfg = build_config("seer", "small", {"data": str(synth_data), "arch": "regnety_002", "epochs": 1, "batch_size": 100,
                                         "num_workers": 0})  # the smallest RegNetY keeps the test quick
    run = pretrain(cfg, tmp_path / "seer", device="cpu")
    assert (run / "encoder.safetensors").exists() and "method: swav" in (run / "config.yaml").read_text()


def test_methods_command_lists_the_seer_recipe() -> None:
    from typer.testing import CliRunner

    from sslcli.cli.app import app

    result = CliRunner().invoke(app, ["methods"], terminal_width=200)
    # The table may wrap a long description onto the next line: read the rows as one text.
    text = " ".join(result.output.split())
    start = text.index(" seer Goyal et al. 2021")
    assert "a recipe of swav" in text[start:text.index(" simclr ", start)]
