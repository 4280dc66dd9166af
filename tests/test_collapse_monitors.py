"""Collapse and health monitors: effective rank (RankMe) and distribution entropy against independent
computations, the warning thresholds, and a real collapse (SimSiam without stop-gradient) that the
training loop reports while the same run with stop-gradient does not."""

import json
import math
from pathlib import Path

import pytest
import torch

from sslcli.config import build_config
from sslcli.engine.metrics import CollapseMonitor, TrainProgress
from sslcli.losses import distribution_entropy, effective_rank
from sslcli.pretrain import pretrain


def test_effective_rank_matches_an_svd_reference() -> None:
    g = torch.Generator().manual_seed(0)
    for n, d in [(20, 8), (6, 30)]:  # both Gram-matrix branches
        z = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d)  # unequal directions
        s = torch.linalg.svdvals((z - z.mean(0)).double())
        p = (s / s.sum() + 1e-7).tolist()
        expected = math.exp(-sum(pk * math.log(pk) for pk in p))
        assert float(effective_rank(z)) == pytest.approx(expected, rel=1e-6)


def test_effective_rank_counts_equally_used_directions() -> None:
    basis, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    signs = torch.tensor([[1.0, 1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, -1.0, 1.0], [1.0, 1.0, -1.0],
                          [-1.0, -1.0, 1.0], [-1.0, 1.0, -1.0], [1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]])
    z = signs.double() @ basis[:3]  # 8 points spanning 3 orthogonal directions equally, centred
    assert float(effective_rank(z)) == pytest.approx(3.0, rel=1e-5)
    point = torch.randn(1, 32).expand(16, 32)  # every sample at one point
    assert float(effective_rank(point)) == pytest.approx(1.0, abs=1e-3)


def test_distribution_entropy_matches_an_explicit_loop() -> None:
    logits = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    rows = []
    for row in logits.tolist():
        total = sum(math.exp(v) for v in row)
        rows.append(-sum(math.exp(v) / total * (v - math.log(total)) for v in row))
    assert float(distribution_entropy(logits)) == pytest.approx(sum(rows) / 5, rel=1e-5)
    assert float(distribution_entropy(torch.zeros(3, 10))) == pytest.approx(math.log(10))
    assert float(distribution_entropy(torch.eye(4), probs=True)) == pytest.approx(0.0, abs=1e-6)


def test_monitor_warns_once_on_collapse_and_never_on_spread_embeddings(capsys: pytest.CaptureFixture) -> None:
    monitor = CollapseMonitor()
    assert monitor(None, 1) == {}
    spread = monitor(torch.randn(128, 64), 1)
    assert spread["embed_std"] == pytest.approx(1 / 8, rel=0.1) and spread["embed_rank"] > 40
    assert "collapsed" not in capsys.readouterr().err
    line = torch.randn(128, 1) * torch.randn(1, 64)  # every sample on one line through the origin
    assert monitor(line + 0.01 * torch.randn(128, 64), 5)["embed_rank"] < 2
    assert monitor(line, 6)["embed_rank"] < 2
    err = capsys.readouterr().err
    assert err.count("collapsed") == 1 and "step 5" in err
    # near one point: the centred noise still spans many directions, the std gives it away
    point = CollapseMonitor()(torch.ones(128, 64) + 1e-3 * torch.randn(128, 64), 7)
    assert point["embed_std"] < 0.1 / 8 and point["embed_rank"] > 10 and "collapsed" in capsys.readouterr().err


def _run(data: Path, out: Path, stop_gradient: bool) -> list[dict]:
    """SimSiam for 36 steps on 16-px views; SGD at a high rate, so that without the stop-gradient it
    collapses within them (LARS moves the weights too little in so few steps)."""
    views = [{"count": 2, "size": 16, "scale": [0.5, 1.0], "jitter": [0.4, 0.4, 0.4, 0.1], "blur_p": 0.0}]
    options = {"data": str(data), "epochs": 2, "batch_size": 32, "num_workers": 0, "augment.views": views}
    sets = ["log_every=4", "optim.name=sgd", "optim.lr=2.0", "optim.weight_decay=1e-4", "optim.warmup_epochs=0",
            "method_args.dim=64", "method_args.proj_hidden=64", "method_args.pred_hidden=16",
            # the paper's heads: 3-layer projector with its output BN, every parameter decayed, predictor lr fixed
            "method_args.proj_layers=3", "method_args.proj_last_norm=bn_noaffine", "method_args.wd_all=true",
            "method_args.fix_pred_lr=true",
            f"method_args.stop_gradient={str(stop_gradient).lower()}"]
    run = pretrain(build_config("simsiam", "small", options, sets), out, device="cpu")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_simsiam_without_stop_gradient_collapses_and_the_loop_warns(synth_data: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    healthy = _run(synth_data, tmp_path / "sg", stop_gradient=True)
    assert "collapsed" not in capsys.readouterr().err
    collapsed = _run(synth_data, tmp_path / "no-sg", stop_gradient=False)
    assert capsys.readouterr().err.count("collapsed") == 1
    assert all("embed_std" in r and "embed_rank" in r for r in healthy + collapsed)
    # the trivial solution: over the last 16 steps the loss is lower while the embeddings fold onto a line (the BN
    # after the projector keeps every dimension's spread, so embed_std falls less than embed_rank)
    late_healthy, late_collapsed = healthy[-4:], collapsed[-4:]
    assert max(r["loss"] for r in late_collapsed) < min(r["loss"] for r in late_healthy)
    assert max(r["embed_rank"] for r in late_collapsed) < min(r["embed_rank"] for r in late_healthy) / 3
    assert max(r["embed_std"] for r in late_collapsed) < min(r["embed_std"] for r in late_healthy)


def test_progress_bar_shows_the_monitors_and_dino_swav_entropies() -> None:
    progress = TrainProgress(total_steps=10, done_steps=0)
    progress.update(epoch=0, loss=1.0, lr=0.1, ips=5.0, embed_std=0.0312, embed_rank=17.04,
                    teacher_entropy=6.1986, student_entropy=6.631)
    assert progress.bar.tasks[0].fields["health"] == "  std 0.031 rank 17.0 H_t 6.20 H_s 6.63"
    progress.update(epoch=0, loss=1.0, lr=0.1, ips=5.0, embed_std=0.0312, embed_rank=17.04)
    assert progress.bar.tasks[0].fields["health"] == "  std 0.031 rank 17.0"
