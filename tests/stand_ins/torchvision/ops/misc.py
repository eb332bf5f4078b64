"""torchvision.ops.misc.FrozenBatchNorm2d, which open_clip's utils import for ResNet towers."""
from torchvision import missing_class

FrozenBatchNorm2d = missing_class("FrozenBatchNorm2d")
