"""The standard FID Inception-v3, in plain torch, loaded from a local weights file.

This is the network of pytorch-fid's ``fid_inception_v3`` (weights
``pt_inception-2015-12-05-6726825d.pth``, ported from TensorFlow's 2015 Inception graph that
the original FID, sFID and IS code use): torchvision's Inception3 trunk with 1008 classes, no
aux head, and the FID patches: average pools that ignore padding (``FIDInceptionA/C/E_1``) and
a max pool in the last block (``FIDInceptionE_2``). Module and parameter names follow
torchvision, so the published state dict loads as is. Nothing is ever downloaded: the weights
path is the param ``reference.inception_weights``.

Outputs (input resized to 299x299, see ``FIDInceptionV3.extract``):
- features: pool3, ``[N, 2048]`` (FID, precision/recall);
- spatial: the first 7 channels of ``mixed_6/conv`` (= ``Mixed_6d.branch1x1`` after its ReLU),
  ``[N, 7 * 17 * 17 = 2023]``, as in the sFID paper (Nash et al. 2021). The flattening order
  (C, H, W) differs from TensorFlow's (H, W, C); Frechet distances do not depend on it;
- logits: ``[N, 1008]`` (IS).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from edadm.errors import ParamError
from edadm.metrics.extractors import Extracted, FeatureExtractor

logger = logging.getLogger(__name__)

WEIGHTS_PARAM = "reference.inception_weights"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"
INPUT_SIZE = 299
SPATIAL_CHANNELS = 7


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TensorFlow's) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # FID patch: TensorFlow's average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block (Mixed_5b/c/d): 64 + 64 + 96 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(_avg_pool_same(x))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): 384 + 96 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionC(nn.Module):
    """17x17 block (Mixed_6b..e) with factorised 7x7 convs: 4 x 192 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_3(self.branch7x7dbl_2(branch7x7dbl))
        branch7x7dbl = self.branch7x7dbl_5(self.branch7x7dbl_4(branch7x7dbl))
        branch_pool = self.branch_pool(_avg_pool_same(x))
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): 320 + 192 + in_channels channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
        branch7x7x3 = self.branch7x7x3_2(self.branch7x7x3_1(x))
        branch7x7x3 = self.branch7x7x3_4(self.branch7x7x3_3(branch7x7x3))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch7x7x3, branch_pool], 1)


class FIDInceptionE(nn.Module):
    """8x8 block (Mixed_7b/c): 320 + 768 + 768 + 192 = 2048 channels.

    ``pool="avg"`` is pytorch-fid's FIDInceptionE_1 (Mixed_7b); ``pool="max"`` is
    FIDInceptionE_2 (Mixed_7c), where the TensorFlow graph uses a max pool.
    """

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat([self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        if self.pool == "avg":
            pooled = _avg_pool_same(x)
        else:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(pooled)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class FIDInceptionV3(FeatureExtractor):
    """The FID Inception-v3 as a ``FeatureExtractor`` (see the module docstring for outputs).

    Build it with random weights (tests) or, for real use, through ``load_fid_inception``.
    """

    name = "inception"
    feature_dim = 2048
    spatial_dim = SPATIAL_CHANNELS * 17 * 17
    num_classes = 1008

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg")
        self.Mixed_7c = FIDInceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, self.num_classes)

    @staticmethod
    def preprocess(x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, 1 or 3, H, W]`` in [-1, 1] -> ``[N, 3, 299, 299]`` as the network expects.

        Grey images are repeated to 3 channels; resizing is bilinear (align_corners=False), as
        pytorch-fid does. Inputs must already be in [-1, 1] (pytorch-fid's normalize_input
        maps [0, 1] to this range; our samples are in it already).
        """
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"FID Inception takes [N, 1 or 3, H, W] images in [-1, 1], got {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return x

    def extract(self, x: torch.Tensor) -> Extracted:
        x = self.preprocess(x)  # [N, 3, 299, 299]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 64, 73, 73]
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # [N, 288, 35, 35]
        x = self.Mixed_6a(x)  # [N, 768, 17, 17]
        x = self.Mixed_6c(self.Mixed_6b(x))
        # TensorFlow's "mixed_6/conv" is Mixed_6d's 1x1 branch. Running it again here costs <1%
        # of the network (a 1x1 conv at 17x17) and keeps the forward pass free of hooks.
        spatial = self.Mixed_6d.branch1x1(x)[:, :SPATIAL_CHANNELS].flatten(1)  # [N, 2023]
        x = self.Mixed_6e(self.Mixed_6d(x))  # [N, 768, 17, 17]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # [N, 2048, 8, 8]
        features = x.mean(dim=(2, 3))  # pool3: [N, 2048]
        return Extracted(features=features, spatial=spatial, logits=self.fc(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 1008]``."""
        return self.extract(x).logits


def load_fid_inception(weights: str | Path | None, device: torch.device | str = "cpu") -> FIDInceptionV3:
    """The FID Inception-v3 with the state dict in the local file ``weights`` (eval mode).

    ``weights`` is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (or any state dict of
    this architecture, ``torch.save``-d or ``.safetensors``). Raises ParamError naming
    ``reference.inception_weights`` when the path is unset, missing, unreadable or not this
    architecture's weights. Never downloads.
    """
    fix = (
        f"set {WEIGHTS_PARAM} to a local copy of pytorch-fid's FID Inception weights: download {WEIGHTS_URL} "
        f"on a machine with internet access and copy it here (no download happens at run time)"
    )
    if weights is None:
        raise ParamError(f"param {WEIGHTS_PARAM} is not set; {fix}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ParamError(f"param {WEIGHTS_PARAM}={str(weights)!r}: file not found; {fix}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state_dict = load_file(str(path))
        else:
            # weights_only: a .pth is a pickle, and we never unpickle arbitrary objects.
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ParamError(
            f"param {WEIGHTS_PARAM}={str(weights)!r} could not be read as a state dict ({err}); {fix}"
        ) from err
    if not isinstance(state_dict, dict):
        raise ParamError(
            f"param {WEIGHTS_PARAM}={str(weights)!r} holds a "
            f"{type(state_dict).__name__}, not a state dict; {fix}"
        )

    model = FIDInceptionV3()
    expected = model.state_dict()
    # Checkpoints saved before torch 0.4.1 lack BatchNorm's num_batches_tracked, unused in eval.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''} ({len(items)})"
            for label, items in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("wrong shape", mismatched),
            )
            if items
        )
        raise ParamError(
            f"param {WEIGHTS_PARAM}={str(weights)!r} does not match the FID Inception-v3 architecture "
            f"({details}); {fix}"
        )
    model.load_state_dict(state_dict, strict=False)
    logger.info("loaded FID Inception-v3 weights from %s", path)
    return model.eval().to(device)
