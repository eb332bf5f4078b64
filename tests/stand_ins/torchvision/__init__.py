"""A stand-in for torchvision, for the tests only. open_clip and clip_benchmark's metrics
import torchvision's transforms and FrozenBatchNorm2d when they are imported, but their
ViT CLIP models and metric functions never use them. tests/test_interop.py puts
tests/stand_ins on sys.path only when `import torchvision` fails. Building any class here
raises; InterpolationMode's members exist, since open_clip names them in default arguments."""
from enum import Enum

__version__ = "0.0.0+stand-in"


class Missing:
    """A torchvision class that open_clip names (or subclasses) at import time."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError(f"{type(self).__name__} needs the real torchvision; "
                           "tests/stand_ins/torchvision only lets open_clip import")


def missing_class(name):
    return type(name, (Missing,), {})


def missing_attribute(module_name, name):
    """What a stand-in module's __getattr__ raises for a name it does not define."""
    raise AttributeError(f"{module_name}.{name} needs the real torchvision; "
                         "tests/stand_ins/torchvision only lets open_clip import")


class InterpolationMode(Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
