"""DeepCluster (Caron, Bojanowski, Joulin, Douze, 2018, "Deep Clustering for Unsupervised Learning of Visual Features").

    every epoch:
        F = [mlp(f(sobel(x))) for x in train set]        # centre crops, eval mode
        y = kmeans(l2(whiten(pca(F, 256))), k)            # pseudo-labels, one per image
        top = Linear(d, k) re-initialised; its momentum dropped
        for x, i in loader:                                # augmented crops
            loss = w[y_i] * CE(top(relu(mlp(f(sobel(x))))), y_i)   # w: uniform over clusters

The paper's Sobel filter (grey image -> x/y gradients) removes colour, which k-means would otherwise
cluster on; the exported backbone takes 2-channel Sobel input (metadata ``input_space: sobel``, which
``sslcli knn`` / ``linear-probe`` apply).  The paper samples images uniformly over clusters; a
streamed loader cannot, so each sample's loss is weighted by ``N / (K' |C_y|)`` (``K'`` non-empty
clusters), which gives the same expected gradient.  Every rank clusters identically; rank 0's
labels are broadcast so that floating-point differences cannot split them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslcli import distributed as dist
from sslcli.augment import AugmentConfig
from sslcli.colorspace import to_input_space
from sslcli.engine.kmeans import kmeans, pca_whiten
from sslcli.errors import UserError
from sslcli.methods.base import Method, StepOutput, register_method
from sslcli.models.encoders import Encoder
from sslcli.models.heads import build_mlp
from sslcli.models.view_encoders import build_view_encoder, view_spec


class InputFilter(nn.Module):
    """The loader's normalised RGB -> the backbone's input space (identity for ``rgb``)."""

    def __init__(self, space: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.space = space
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.space == "rgb":
            return x
        with torch.autocast(x.device.type, enabled=False):
            return to_input_space(x.float() * self.std + self.mean, self.space)


@register_method("deepcluster")
class DeepCluster(Method):
    """DeepCluster (Caron et al., ECCV 2018): k-means pseudo-labels of the whole dataset each epoch, then classification."""

    def __init__(self, encoder: Encoder, num_samples: int, augment: AugmentConfig | None = None,
                 num_clusters: int = 10000, pca_dim: int = 256, mlp_hidden: int = 4096, mlp_layers: int = 2,
                 kmeans_iterations: int = 20, sobel: bool = True, uniform_clusters: bool = True,
                 reassign_every: int = 1) -> None:
        if not 2 <= num_clusters <= num_samples:
            raise UserError(f"method_args.num_clusters must be between 2 and the {num_samples} training images, "
                            f"got {num_clusters}")
        if mlp_layers < 0 or pca_dim < 1 or reassign_every < 1:
            raise UserError(f"method_args.mlp_layers must be >= 0, pca_dim >= 1 and reassign_every >= 1, got "
                            f"{mlp_layers}, {pca_dim}, {reassign_every}")
        self.input_space = "sobel" if sobel else "rgb"
        if sobel:
            encoder = build_view_encoder(view_spec(encoder.spec, 2), encoder)
        super().__init__(encoder)
        aug = augment or AugmentConfig()
        self.input_filter = InputFilter(self.input_space, tuple(aug.mean), tuple(aug.std))
        # fc6-fc7 of the paper's AlexNet/VGG as data; clustering reads the last layer before its ReLU.
        self.mlp = build_mlp(encoder.dim, [(mlp_hidden, None, "relu")] * (mlp_layers - 1)
                             + [(mlp_hidden, None, None)] * min(mlp_layers, 1))
        self.top = nn.Linear(mlp_hidden if mlp_layers else encoder.dim, num_clusters)
        self.num_clusters, self.pca_dim, self.kmeans_iterations = num_clusters, pca_dim, kmeans_iterations
        self.uniform_clusters, self.reassign_every = uniform_clusters, reassign_every
        self.register_buffer("pseudo_labels", torch.full((num_samples,), -1, dtype=torch.long))
        self.register_buffer("label_weights", torch.ones(num_clusters))
        # Checked on the host, once per clustering or checkpoint load: a per-step check of the labels
        # would be a device sync (and a graph break when compiled).
        self.clustered = False
        self.register_load_state_dict_post_hook(
            lambda module, _: setattr(module, "clustered", bool((module.pseudo_labels >= 0).all())))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What k-means clusters: the MLP's output before its last ReLU."""
        return self.mlp(self.backbone(self.input_filter(x)))

    def before_epoch(self, epoch: int, dataset_features: Callable[[nn.Module], torch.Tensor]) -> list[nn.Parameter]:
        # The official code's --reassign: epochs of training between two clusterings (1 in the paper). On a
        # small dataset an epoch is too few steps for the new top layer to fit its clusters.
        if epoch % self.reassign_every and self.clustered:
            return []
        feats = dataset_features(_Features(self))  # [N, d] in sample-index order
        x = pca_whiten(feats, self.pca_dim)
        _, labels = kmeans(x.to(self.pseudo_labels.device), self.num_clusters, iterations=self.kmeans_iterations,
                           seed=epoch)
        labels = dist.broadcast_(labels.to(self.pseudo_labels.device))
        self.pseudo_labels.copy_(labels)
        self.clustered = True
        counts = torch.bincount(labels, minlength=self.num_clusters).float()
        filled = counts > 0
        self.label_weights.zero_()
        self.label_weights[filled] = labels.numel() / (filled.sum() * counts[filled])
        with torch.no_grad():  # the official re-initialisation of the top layer
            self.top.weight.normal_(0, 0.01)
            self.top.bias.zero_()
        return list(self.top.parameters())

    def forward(self, views: list[torch.Tensor], batch: dict[str, Any]) -> StepOutput:
        if not self.clustered:
            raise RuntimeError("deepcluster has no pseudo-labels: before_epoch() must run before each epoch")
        y = self.pseudo_labels[batch["index"].to(self.pseudo_labels.device)]
        h = self.features(views[0])
        logits = self.top(F.relu(h)).float()
        ce = F.cross_entropy(logits, y, reduction="none")
        w = self.label_weights[y] if self.uniform_clusters else torch.ones_like(ce)
        loss = (w * ce).mean()
        with torch.no_grad():
            acc = (logits.argmax(1) == y).float().mean()
            used = (self.label_weights > 0).sum().float()
        return StepOutput(loss, {"pseudo_acc": acc, "clusters": used}, embedding=h)

    def export_metadata(self) -> dict[str, Any]:
        if self.input_space == "rgb":
            return {}
        return {"input_space": self.input_space, "mean": [0.0, 0.0], "std": [1.0, 1.0]}

    def describe(self) -> dict[str, str]:
        every = "every epoch" if self.reassign_every == 1 else f"every {self.reassign_every} epochs"
        return {"clusters": f"k-means k={self.num_clusters} on PCA-{self.pca_dim} whitened features, {every}",
                "input": self.input_space, "sampling": "uniform over clusters (loss weights)"
                if self.uniform_clusters else "uniform over images"}


class _Features(nn.Module):
    """``method.features`` as a module, for the feature extractor (which moves it and sets eval mode)."""

    def __init__(self, method: DeepCluster) -> None:
        super().__init__()
        self.method = method

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.features(x)
