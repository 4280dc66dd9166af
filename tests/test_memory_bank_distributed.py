"""The memory bank across 2 real gloo ranks: 2 ranks x B/2 leave the same bank as 1 rank x B."""

from pathlib import Path

import torch

from dist_launch import run_single, torchrun


def test_instdisc_bank_two_ranks_equal_one_rank(tmp_path: Path) -> None:
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    run_single("memory_bank_equivalence.py", str(one))
    torchrun("memory_bank_equivalence.py", str(two))
    a, b = torch.load(one), torch.load(two)
    assert a["world"] == 1 and b["world"] == 2
    assert torch.allclose(a["bank"], b["bank"], atol=1e-5)
    written = torch.zeros(a["bank"].shape[0], dtype=torch.bool).index_fill_(0, a["touched"], True)
    assert torch.equal(b["bank"][~written], b["initial"][~written])  # rows no step wrote keep their values
    assert not torch.isclose(b["bank"][written], b["initial"][written]).all(dim=1).any()
    assert torch.allclose(a["bank"].norm(dim=1), torch.ones(a["bank"].shape[0]), atol=1e-5)
    assert a["partition"] > 0 and torch.allclose(a["partition"], b["partition"], rtol=1e-5)
    assert torch.allclose(a["losses"], b["losses"], rtol=1e-5, atol=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for key in a["grads"]:
        assert torch.allclose(a["grads"][key], b["grads"][key], rtol=1e-4, atol=1e-6), key
