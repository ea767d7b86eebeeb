"""learn2learn's ``vision.models``: the standard few-shot backbones with a linear head.

Every model is ``classifier(features(x))``, with ``features`` and ``classifier`` attributes (so
``model.features`` is the embedding network, e.g. for ANIL or a prototypical classifier):

* ``OmniglotFC(input_size, output_size, sizes=None)``: Santoro et al. 2016's MLP. Flatten, then per
  hidden size (default 256, 128, 64, 64) Linear, BatchNorm1d (batch statistics only), ReLU.
* ``OmniglotCNN(output_size=5, hidden_size=64, layers=4)``: Finn et al. 2017's Omniglot network on
  ``[N, 1, 28, 28]`` (any ``[N, 784]`` is reshaped): ``layers`` x [3x3 conv with stride 2, BatchNorm,
  ReLU], then the mean over space, ``hidden_size`` features.
* ``CNN4(output_size, hidden_size=64, layers=4, channels=3, max_pool=True, embedding_size=None)``:
  Ravi & Larochelle 2017's network on ``[N, 3, 84, 84]``: ``layers`` x [3x3 conv, BatchNorm, ReLU,
  max-pool] (pool 2 for 4 layers, ``2 * (4 // layers)`` in general), flattened:
  ``embedding_size`` = 25 * hidden_size at 84x84 (give it for other sizes, e.g. 4 * hidden_size at
  32x32). ``CNN4Backbone`` is its ``features`` alone.
* ``MiniImagenetCNN(output_size, hidden_size=32, layers=4)``: ``CNN4`` with 32 filters, as in the
  MAML paper's miniImageNet experiments.
* ``ResNet12(output_size, hidden_size=640, avg_pool=True, wider=True, embedding_dropout=0.0,
  dropblock_dropout=0.1, dropblock_size=5, channels=3)``: the ResNet-12 of Lee et al. 2019
  (MetaOptNet) / Oreshkin et al. 2018; ``ResNet12Backbone`` is its ``features``.

Initialisation as learn2learn: convolutions Xavier-uniform with zero bias and BatchNorm weights
uniform in [0, 1) (conv blocks); linear layers of ``OmniglotFC`` truncated normal (std 0.01);
ResNet-12 Kaiming-normal (fan out). BatchNorm layers are ordinary ``nn.BatchNorm2d`` (running
statistics, used in ``eval()`` mode), except ``OmniglotFC``'s, which use batch statistics only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.learn2learn.nn import Flatten, Lambda

__all__ = ["fc_init_", "maml_init_", "LinearBlock", "ConvBlock", "ConvBase", "OmniglotFC", "OmniglotCNN", "CNN4",
           "CNN4Backbone", "MiniImagenetCNN", "ResNet12", "ResNet12Backbone", "DropBlock"]


def fc_init_(module: nn.Module) -> nn.Module:
    """Weight truncated normal (std 0.01, cut at 2 std), bias 0, in place; returns ``module``."""
    if getattr(module, "weight", None) is not None:
        nn.init.trunc_normal_(module.weight, mean=0.0, std=0.01, a=-0.02, b=0.02)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def maml_init_(module: nn.Module) -> nn.Module:
    """Weight Xavier-uniform (gain 1), bias 0, in place (the MAML reference code's init); returns ``module``."""
    nn.init.xavier_uniform_(module.weight, gain=1.0)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


class LinearBlock(nn.Module):
    """Linear, BatchNorm1d (batch statistics only: ``track_running_stats=False``), ReLU."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.linear = fc_init_(nn.Linear(input_size, output_size))
        self.normalize = nn.BatchNorm1d(output_size, affine=True, momentum=0.999, eps=1e-3,
                                        track_running_stats=False)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.normalize(self.linear(x)))


class ConvBlock(nn.Module):
    """3x3 conv (padding 1), BatchNorm2d, ReLU, then a ``2 * max_pool_factor`` max-pool; without
    ``max_pool`` the convolution strides by that factor instead (the Omniglot network)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size=(3, 3), max_pool: bool = True,
                 max_pool_factor: float = 1.0):
        super().__init__()
        factor = int(2 * max_pool_factor)
        self.max_pool = nn.MaxPool2d(factor, stride=factor) if max_pool else nn.Identity()
        self.conv = maml_init_(nn.Conv2d(in_channels, out_channels, kernel_size,
                                         stride=1 if max_pool else factor, padding=1, bias=True))
        self.normalize = nn.BatchNorm2d(out_channels, affine=True)
        nn.init.uniform_(self.normalize.weight)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.max_pool(self.relu(self.normalize(self.conv(x))))


class ConvBase(nn.Sequential):
    """``layers`` ConvBlocks of ``hidden`` filters on ``channels`` input channels."""

    def __init__(self, hidden: int = 64, channels: int = 1, max_pool: bool = False, layers: int = 4,
                 max_pool_factor: float = 1.0):
        super().__init__(*(ConvBlock(channels if i == 0 else hidden, hidden, (3, 3), max_pool=max_pool,
                                     max_pool_factor=max_pool_factor) for i in range(layers)))


class OmniglotFC(nn.Module):
    """Santoro et al. 2016's fully connected network: ``[N, ...]`` flattened to ``input_size`` -> ``[N, output_size]``."""

    def __init__(self, input_size: int, output_size: int, sizes: list[int] | None = None):
        super().__init__()
        sizes = [256, 128, 64, 64] if sizes is None else list(sizes)
        blocks = [LinearBlock(i, o) for i, o in zip([input_size] + sizes[:-1], sizes)]
        self.features = nn.Sequential(Flatten(), nn.Sequential(*blocks))
        self.classifier = fc_init_(nn.Linear(sizes[-1], output_size))
        self.input_size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _as_omniglot(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, 1, 28, 28)


def _spatial_mean(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=(2, 3))


class OmniglotCNN(nn.Module):
    """Finn et al. 2017's Omniglot network: ``[N, 1, 28, 28]`` -> ``[N, output_size]``."""

    def __init__(self, output_size: int = 5, hidden_size: int = 64, layers: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.base = ConvBase(hidden=hidden_size, channels=1, max_pool=False, layers=layers)
        # Module-level functions rather than lambdas: the model pickles (torch.save, deepcopy).
        self.features = nn.Sequential(Lambda(_as_omniglot), self.base, Lambda(_spatial_mean), Flatten())
        self.classifier = nn.Linear(hidden_size, output_size, bias=True)
        nn.init.normal_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class CNN4Backbone(ConvBase):
    """``CNN4``'s feature extractor: the conv blocks, flattened to ``[N, hidden_size * h * w]``."""

    def __init__(self, hidden_size: int = 64, layers: int = 4, channels: int = 3, max_pool: bool = False,
                 max_pool_factor: float = 1.0):
        super().__init__(hidden=hidden_size, layers=layers, channels=channels, max_pool=max_pool,
                         max_pool_factor=max_pool_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return x.reshape(x.size(0), -1)


class CNN4(nn.Module):
    """Ravi & Larochelle 2017's four-block CNN: ``[N, channels, 84, 84]`` -> ``[N, output_size]``."""

    def __init__(self, output_size: int, hidden_size: int = 64, layers: int = 4, channels: int = 3,
                 max_pool: bool = True, embedding_size: int | None = None):
        super().__init__()
        if embedding_size is None:
            embedding_size = 25 * hidden_size  # 5x5 maps: 84x84 inputs
        # Fewer layers pool harder, so the embedding has the same size (4 // layers: 2 layers pool by 4).
        self.features = CNN4Backbone(hidden_size=hidden_size, channels=channels, max_pool=max_pool, layers=layers,
                                     max_pool_factor=4 // layers)
        self.classifier = maml_init_(nn.Linear(embedding_size, output_size, bias=True))
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MiniImagenetCNN(CNN4):
    """``CNN4`` with 32 filters by default: the MAML paper's miniImageNet network."""

    def __init__(self, output_size: int, hidden_size: int = 32, layers: int = 4):
        super().__init__(output_size, hidden_size=hidden_size, layers=layers, channels=3, max_pool=True)


# ----------------------------------------------------------------------------- ResNet-12


class DropBlock(nn.Module):
    """DropBlock (Ghiasi et al. 2018), in training mode only: zero ``block_size`` x ``block_size`` squares whose
    top-left corners are drawn with probability ``gamma`` (where a whole block fits), then rescale by
    (entries / entries kept) so the expected sum is unchanged."""

    def __init__(self, block_size: int):
        super().__init__()
        self.block_size = block_size

    def forward(self, x: torch.Tensor, gamma: float) -> torch.Tensor:
        if not self.training or gamma <= 0:
            return x
        n, c, h, w = x.shape
        size = min(self.block_size, h, w)  # at 84x84 the last block's map is 5x5: a block cannot exceed it
        seeds = torch.bernoulli(torch.full((n, c, h - size + 1, w - size + 1), float(gamma), device=x.device,
                                           dtype=x.dtype))
        # Each seed covers the block to its lower right: a max-pool of the seeds padded by size-1 above/left.
        covered = F.max_pool2d(F.pad(seeds, (size - 1, size - 1, size - 1, size - 1)), size, stride=1)
        keep = 1.0 - covered
        kept = keep.sum()
        if kept == 0:
            return x * keep
        return x * keep * (keep.numel() / kept)


class _ResBlock(nn.Module):
    """3 x [3x3 conv (no bias), BatchNorm] with LeakyReLU(0.1) between, plus a 1x1-conv+BatchNorm shortcut,
    LeakyReLU, 2x2 max-pool; then dropout, or DropBlock with the reference code's warm-up of the rate."""

    #: training forwards over which DropBlock's rate ramps up from 0 to its value (Lee et al.'s schedule)
    RAMP = 40000

    def __init__(self, inplanes: int, planes: int, drop_rate: float, drop_block: bool, block_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.relu = nn.LeakyReLU(0.1)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.maxpool = nn.MaxPool2d(2)
        self.drop_rate = drop_rate
        self.drop_block = drop_block
        self.block_size = block_size
        self.DropBlock = DropBlock(block_size)
        self.num_batches_tracked = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = self.maxpool(self.relu(out + self.downsample(x)))
        if self.drop_rate <= 0 or not self.training:
            return out
        self.num_batches_tracked += 1
        if not self.drop_block:
            return F.dropout(out, p=self.drop_rate, training=True)
        keep_rate = max(1.0 - self.drop_rate / self.RAMP * self.num_batches_tracked, 1.0 - self.drop_rate)
        size = out.size(2)
        block = min(self.block_size, size)  # as DropBlock clips it
        # The seed rate that drops a fraction 1 - keep_rate of the map (the DropBlock paper's eq. 1).
        gamma = (1 - keep_rate) / block ** 2 * size ** 2 / (size - block + 1) ** 2
        return self.DropBlock(out, gamma=gamma)


class ResNet12Backbone(nn.Module):
    """ResNet-12's feature extractor: ``[N, channels, H, W]`` -> ``[N, 640]`` (``avg_pool``) or
    ``[N, 640 * h * w]`` (16000 at 84x84) without it; widths 64-160-320-640 (``wider``) or 64-128-256-512.
    DropBlock (``dropblock_dropout``, ``dropblock_size``) after blocks 3-4 and dropout at that rate
    after blocks 1-2, in training mode; ``embedding_dropout`` on the output."""

    def __init__(self, avg_pool: bool = True, wider: bool = True, embedding_dropout: float = 0.0,
                 dropblock_dropout: float = 0.1, dropblock_size: int = 5, channels: int = 3):
        super().__init__()
        widths = (64, 160, 320, 640) if wider else (64, 128, 256, 512)
        blocks, inplanes = [], channels
        for i, planes in enumerate(widths):
            blocks.append(_ResBlock(inplanes, planes, dropblock_dropout, drop_block=i >= 2, block_size=dropblock_size))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = blocks
        # The mean over the whole map: learn2learn's 5x5 average pool at 84x84, and any other input size too.
        self.avgpool = nn.AdaptiveAvgPool2d(1) if avg_pool else nn.Identity()
        self.flatten = Flatten()
        self.dropout = nn.Dropout(p=embedding_dropout)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(self.flatten(self.avgpool(x)))


class ResNet12(nn.Module):
    """ResNet-12 (Lee et al. 2019; Oreshkin et al. 2018) with a linear head: ``[N, 3, 84, 84]`` ->
    ``[N, output_size]``. ``hidden_size`` is the embedding size: 640 with ``avg_pool`` (512 if not
    ``wider``), 16000 without it at 84x84."""

    def __init__(self, output_size: int, hidden_size: int = 640, avg_pool: bool = True, wider: bool = True,
                 embedding_dropout: float = 0.0, dropblock_dropout: float = 0.1, dropblock_size: int = 5,
                 channels: int = 3):
        super().__init__()
        self.features = ResNet12Backbone(avg_pool=avg_pool, wider=wider, embedding_dropout=embedding_dropout,
                                         dropblock_dropout=dropblock_dropout, dropblock_size=dropblock_size,
                                         channels=channels)
        self.classifier = nn.Linear(hidden_size, output_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
