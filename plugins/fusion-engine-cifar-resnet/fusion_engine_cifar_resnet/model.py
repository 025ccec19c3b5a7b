"""The CIFAR ResNet of He et al. 2016 (sec. 4.2) with parameter-free option-A shortcuts.

Module names match akamaster/pytorch_resnet_cifar10 checkpoints without the
``module.`` prefix: conv1, bn1, layer{1,2,3}.{i}.conv{1,2}/bn{1,2}, linear.
"""

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9}  # name -> blocks per stage


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn layers plus an identity or option-A (subsample and zero-pad) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = stride != 1 or in_planes != planes
        self.pad = planes // 4

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if not self.downsample:
            return x
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: conv(16), three stages at 16/32/64 channels, linear(64->10)."""

    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, blocks_per_stage, 1)
        self.layer2 = self._stage(16, 32, blocks_per_stage, 2)
        self.layer3 = self._stage(32, 64, blocks_per_stage, 2)
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output maps of the three stages: (B,16,32,32), (B,32,16,16), (B,64,8,8)."""
        x = F.relu(self.bn1(self.conv1(x)))
        stages = []
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer(x)
            stages.append(x)
        return stages

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final feature map, (B, 64, 8, 8) for 32x32 input."""
        return self.forward_stages(x)[-1]

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pool and the linear classifier."""
        return self.linear(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
