"""CMC (Tian, Krishnan, Isola, 2019, "Contrastive Multiview Coding", arXiv:1906.05849).

    x = one crop + flip of the image (+ the same crop of each extra field, e.g. depth.png)
    lab = (Lab(x) - mean) / std;  views: L = lab[:1], ab = lab[1:], extras   # Lab as CMC's code
    z_v = normalize(g_v(f_v(view_v)))           # one encoder f_v and linear head g_v per view
    for each edge (i, j) of the graph:           # full: every pair; core: (core view, j) for j != core
        loss += c(z_i, bank_j) + c(z_j, bank_i)  # anchor of one view against the other view's memory
    c(z, bank) = NCE(z, bank[idx], bank[noise], Z) or CE([z.bank[idx], z.bank[noise]] / t, 0)
    bank_v[idx] <- normalize(m bank_v[idx] + (1 - m) z_v)   for all_gather(idx, z_v); m = 0.5

As in CMC's ``NCEAverage``: one memory bank per view (N x 128, a row per training image), the
positive of an anchor from view i is the *other* view's stored row of the same image (read before
this step's update), negatives are uniformly drawn rows of that bank, ``Z`` is estimated once per
direction on the first batch.  ``loss: nce`` is the paper's NCE (CMC's default), ``loss: softmax``
CMC's ``--softmax`` (InfoNCE over the positive and the noise rows).  Here one draw of
``num_negatives`` rows serves the whole batch and every bank (CMC draws per sample; both estimates
are unbiased, the shared draw costs a [K, D] gather instead of a [B, K, D] one).

``self.backbone`` is the L encoder (in_chans 1): the exported weights load into timm with
``in_chans=1`` and expect the L channel of CIE Lab (D65, as ``skimage.color.rgb2lab``, L in
[0, 100]) normalised as ``(L - 50) / 50``; the metadata says so (``input_space: lab_l``, mean
[50], std [50]) and ``sslcli knn`` / ``linear-probe`` apply it.  :func:`sslcli.evaluation.multiview.concat_encoder` gives
CMC's evaluation input instead: the L and ab features concatenated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.augment import AugmentConfig
from sslcli.colorspace import LAB_MEAN, LAB_STD, normalised_rgb_to_lab
from sslcli.engine.device import laid_out_for
from sslcli.engine.memory_bank import MemoryBank
from sslcli.engine.view_graph import GRAPHS, directions, pairwise_edges
from sslcli.errors import UserError
from sslcli.losses import collapse_std, info_nce
from sslcli.losses.nce import estimate_partition, nce_loss
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp
from sslcli.models.view_encoders import build_view_encoder, view_spec

LOSSES = ("nce", "softmax")


@register_method("cmc")
class CMC(Method):
    """CMC (Tian et al., 2019): an encoder per view (L, ab, extras), pairwise NCE against per-view memory banks."""

    def __init__(self, encoder: Encoder, num_samples: int, augment: AugmentConfig | None = None, dim: int = 128,
                 mlp_hidden: int = 0, head_norm: str | None = None, width: float = 1.0, num_negatives: int = 16384,
                 temperature: float = 0.07, bank_momentum: float = 0.5, loss: str = "nce", graph: str = "full",
                 core_view: str = "l", extra_views: Mapping[str, int] | None = None) -> None:
        extra = dict(extra_views or {})
        for name, channels in extra.items():
            if not isinstance(name, str) or channels not in (1, 3):
                raise UserError(f"method_args.extra_views maps a shard field to 1 or 3 channels "
                                f"(e.g. {{depth.png: 1}}), got {name!r}: {channels!r}")
        if loss not in LOSSES:
            raise UserError(f"method_args.loss must be one of {list(LOSSES)}, got {loss!r}")
        if graph not in GRAPHS:
            raise UserError(f"method_args.graph must be one of {list(GRAPHS)}, got {graph!r}")
        if num_negatives < 1:
            raise UserError(f"method_args.num_negatives must be at least 1, got {num_negatives}")
        if augment is not None and augment.num_views != 1:
            # Two crops would change nothing: the loss never compares this step's L with this step's ab, only
            # each with the other view's bank rows, written at earlier visits (from other crops) anyway.
            raise UserError(f"cmc takes one crop per image (its views are the crop's L and ab channels), but "
                            f"augment.views makes {augment.num_views}; use one view group with count: 1")
        names, channels = ["l", "ab", *extra], [1, 2, *extra.values()]
        if core_view not in names:
            raise UserError(f"method_args.core_view must name a view ({', '.join(names)}), got {core_view!r}")
        encoders = [build_view_encoder(view_spec(encoder.spec, c, width), encoder) for c in channels]
        super().__init__(encoders[0])  # the L encoder is the exported backbone
        self.view_names, self.view_channels = names, channels
        self.view_encoders = nn.ModuleList(encoders[1:])
        hidden = [(mlp_hidden, head_norm, "relu")] if mlp_hidden else []
        self.heads = nn.ModuleList(build_mlp(e.dim, [*hidden, (dim, head_norm, None)]) for e in encoders)
        self.banks = nn.ModuleList(MemoryBank(num_samples, dim) for _ in encoders)
        self.extra = extra
        self.num_negatives, self.temperature, self.bank_momentum = num_negatives, temperature, bank_momentum
        self.loss, self.graph = loss, graph
        self.edges = pairwise_edges(len(encoders), graph, names.index(core_view))
        aug = augment or AugmentConfig()
        # The loader's views are RGB normalised by the recipe's mean/std; Lab needs [0, 1] RGB back.
        self.register_buffer("rgb_mean", torch.tensor(aug.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("rgb_std", torch.tensor(aug.std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_mean", torch.tensor(LAB_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("lab_std", torch.tensor(LAB_STD).view(1, 3, 1, 1), persistent=False)
        # Z of each direction (anchor view, memory view), estimated on the first batch; -1 = not yet.
        self.register_buffer("partition", torch.full((len(encoders), len(encoders)), -1.0))
        self._partition_known = False

    def encoders(self) -> list[Encoder]:
        return [self.backbone, *self.view_encoders]

    def lab(self, rgb_normalised: torch.Tensor) -> torch.Tensor:
        """CMC's normalised Lab ``[B, 3, H, W]`` (float32) of the loader's normalised RGB views."""
        return normalised_rgb_to_lab(rgb_normalised, self.rgb_mean, self.rgb_std, self.lab_mean, self.lab_std)

    def view_inputs(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The encoders' inputs: L, ab (from ``views[0]``) and the extra fields (``views[1:]``, same crop)."""
        if len(views) != 1 + len(self.extra):
            raise ValueError(f"cmc expects the image view plus {len(self.extra)} extra view(s), got {len(views)} views")
        lab = laid_out_for(self.lab(views[0]), self.backbone)
        return [lab[:, :1], lab[:, 1:], *views[1:]]

    def embed(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """Unit-norm embeddings ``[B, dim]`` (float32) of every view."""
        return [F.normalize(head(enc(x)).float(), dim=1)
                for enc, head, x in zip(self.encoders(), self.heads, self.view_inputs(views))]

    def _ensure_partition(self, feats: list[torch.Tensor], noise: list[torch.Tensor]) -> None:
        if self._partition_known or self.loss != "nce":
            return
        pairs = directions(self.edges)
        if any(float(self.partition[a, b]) <= 0 for a, b in pairs):  # not estimated yet, nor loaded from a checkpoint
            for a, b in pairs:
                z = estimate_partition(feats[a], noise[b], self.temperature, self.banks[b].size)
                self.partition[a, b] = dist.all_reduce_mean(z)  # one Z on every rank
        self._partition_known = True

    def contrast(self, a: int, b: int, z: torch.Tensor, positives: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Anchors ``z`` of view ``a`` against view ``b``'s memory: its rows of the batch and noise rows."""
        if self.loss == "softmax":
            return info_nce(z, positives, noise, self.temperature)
        return nce_loss(z, positives, noise, self.temperature, self.partition[a, b], self.banks[b].size)

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        feats = self.embed(views)
        idx = batch["index"].to(feats[0].device)
        noise_idx = self.banks[0].sample(self.num_negatives)  # one draw for the batch and every bank
        positives = [bank.rows(idx) for bank in self.banks]  # read before this step's update
        noise = [bank.rows(noise_idx) for bank in self.banks]
        self._ensure_partition(feats, noise)
        logs: dict[str, torch.Tensor | float] = {}
        total = feats[0].new_zeros(())
        for i, j in self.edges:
            edge = self.contrast(i, j, feats[i], positives[j], noise[j])
            edge = edge + self.contrast(j, i, feats[j], positives[i], noise[i])
            total = total + edge
            logs[f"loss_{self.view_names[i]}_{self.view_names[j]}"] = edge.detach()
        all_idx = dist.gather_no_grad(idx)
        for bank, z in zip(self.banks, feats):
            bank.update_(all_idx, dist.gather_no_grad(z), self.bank_momentum)
        with torch.no_grad():
            pairs = directions(self.edges)
            logs["pos_sim"] = torch.stack([(feats[a] * positives[b]).sum(1).mean() for a, b in pairs]).mean()
            logs["noise_sim"] = torch.stack([(feats[a] @ noise[b].T).mean() for a, b in pairs]).mean()
            logs["collapse_std"] = collapse_std(feats[0])
        return StepOutput(total, logs, embedding=feats[0])

    def extra_fields(self) -> dict[str, int]:
        return dict(self.extra)

    def export_metadata(self) -> dict[str, Any]:
        return {"input_space": "lab_l", "mean": [LAB_MEAN[0]], "std": [LAB_STD[0]]}

    def describe(self) -> dict[str, str]:
        views = ", ".join(f"{n} ({c} ch)" for n, c in zip(self.view_names, self.view_channels))
        edges = ", ".join(f"{self.view_names[i]}-{self.view_names[j]}" for i, j in self.edges)
        return {"views": views, "graph": f"{self.graph}: {edges}",
                "memory_banks": f"{len(self.banks)} x {self.banks[0].size} x {self.banks[0].dim}",
                "loss": f"{self.loss}, {self.num_negatives} negatives, t {self.temperature}"}
