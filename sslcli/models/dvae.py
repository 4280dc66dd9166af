"""A discrete VAE image tokenizer: BEiT's stage 1 (Bao et al. 2022, Sec. 2.2, which uses DALL-E's dVAE,
Ramesh et al. 2021, Sec. 2.1), trained by sslcli itself instead of downloaded.

    logits = encoder(x)                     # [B, K, H/s, W/s]: a distribution over K visual words per cell
    z = gumbel_softmax(logits, tau)         # relaxed one-hot (training); argmax = the tokens (inference)
    x_hat = decoder(codebook(z))            # codebook: K -> code_dim, a 1x1 convolution of the one-hot

Encoder and decoder are plain convolution stacks given as data: ``widths`` lists the channels of each
stage; every stage after the first halves (encoder) or doubles (decoder) the resolution, so the grid
stride is ``2 ** (len(widths) - 1)``.  Each stage is ``conv3x3 - ReLU - conv3x3 - ReLU`` with a
residual connection, as DALL-E's groups of residual blocks (no normalisation layers).

The tokenizer travels as one safetensors file whose header holds its layout, so BEiT rebuilds it
without the run that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from sslcli.errors import UserError
from sslcli.weights_file import read_header, write_weights

TOKENIZER_FORMAT = "sslcli-tokenizer/1"


class _ResidualStage(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


def conv_stack(in_ch: int, widths: list[int], out_ch: int, *, direction: str) -> nn.Sequential:
    """``in_ch`` -> ``widths[0]`` (1x1), a residual stage per width with a 2x ``direction`` ('down' or 'up')
    change of resolution between consecutive stages, -> ``out_ch`` (1x1)."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, widths[0], 1), _ResidualStage(widths[0])]
    for prev, width in zip(widths, widths[1:]):
        if direction == "down":
            layers += [nn.Conv2d(prev, width, 4, stride=2, padding=1), nn.ReLU()]
        else:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(prev, width, 3, padding=1), nn.ReLU()]
        layers.append(_ResidualStage(width))
    layers.append(nn.Conv2d(widths[-1], out_ch, 1))
    return nn.Sequential(*layers)


class DiscreteVAE(nn.Module):
    """Image ``[B, C, H, W]`` -> tokens ``[B, H/s, W/s]`` in ``[0, vocab)``, and back to pixels."""

    def __init__(self, vocab: int = 8192, code_dim: int = 256, widths: tuple[int, ...] = (64, 128, 256, 256),
                 channels: int = 3) -> None:
        super().__init__()
        if vocab < 2 or not widths:
            raise UserError(f"a tokenizer needs vocab >= 2 and at least one width; got vocab {vocab}, widths {widths}")
        self.vocab, self.code_dim, self.widths, self.channels = vocab, code_dim, list(widths), channels
        self.stride = 2 ** (len(widths) - 1)
        self.encoder = conv_stack(channels, self.widths, vocab, direction="down")
        self.codebook = nn.Conv2d(vocab, code_dim, 1, bias=False)
        self.decoder = conv_stack(code_dim, self.widths[::-1], channels, direction="up")

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, vocab, H/s, W/s]`` unnormalised log-probabilities of the visual words."""
        if images.shape[-1] % self.stride or images.shape[-2] % self.stride:
            raise UserError(f"the tokenizer's grid stride is {self.stride} px, which does not divide "
                            f"{images.shape[-2]}x{images.shape[-1]} images; use a multiple of {self.stride}")
        return self.encoder(images)

    @torch.no_grad()
    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, H/s, W/s]`` long: the most likely visual word of each cell."""
        return self.logits(images).argmax(dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes`` ``[B, vocab, h, w]`` (one-hot or relaxed) -> images ``[B, C, h s, w s]``."""
        return self.decoder(self.codebook(codes))

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(F.one_hot(tokens, self.vocab).permute(0, 3, 1, 2).float())

    def forward(self, images: torch.Tensor, temperature: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(reconstruction, logits)`` through a Gumbel-softmax relaxation at ``temperature``."""
        logits = self.logits(images)
        soft = F.gumbel_softmax(logits.float(), tau=temperature, hard=False, dim=1)
        return self.decode(soft.to(logits.dtype)), logits

    def layout(self) -> dict[str, str]:
        return {"vocab": str(self.vocab), "code_dim": str(self.code_dim), "widths": json.dumps(self.widths),
                "channels": str(self.channels)}


def save_tokenizer(tokenizer: DiscreteVAE, path: Path, metadata: dict[str, str]) -> Path:
    """Writes the tokenizer's weights with its layout and ``metadata`` (image size, mean, std) in the header."""
    return write_weights(tokenizer.state_dict(), path, {"format": TOKENIZER_FORMAT, **tokenizer.layout(), **metadata})


def load_tokenizer(path: str | Path) -> tuple[DiscreteVAE, dict[str, str]]:
    """A tokenizer file, or a ``dvae`` run directory's ``tokenizer.safetensors``; returns it (eval mode) and
    its header."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.safetensors"
    if not path.is_file():
        raise UserError(f"no tokenizer at '{path}'; train one with `sslcli pretrain dvae --out RUN` and pass "
                        "RUN or RUN/tokenizer.safetensors as method_args.tokenizer")
    meta = read_header(path, TOKENIZER_FORMAT, "is not an sslcli tokenizer; train one with `sslcli pretrain dvae`")
    tokenizer = DiscreteVAE(int(meta["vocab"]), int(meta["code_dim"]), tuple(json.loads(meta["widths"])),
                            int(meta["channels"]))
    tokenizer.load_state_dict(load_file(str(path)), strict=True)
    return tokenizer.eval(), meta
