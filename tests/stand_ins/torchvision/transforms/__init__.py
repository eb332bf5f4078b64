"""torchvision.transforms, the names open_clip's transform.py imports (see the package)."""
from torchvision import InterpolationMode, missing_attribute, missing_class

Normalize = missing_class("Normalize")
Compose = missing_class("Compose")
RandomResizedCrop = missing_class("RandomResizedCrop")
ToTensor = missing_class("ToTensor")
Resize = missing_class("Resize")
CenterCrop = missing_class("CenterCrop")
ColorJitter = missing_class("ColorJitter")
Grayscale = missing_class("Grayscale")


def __getattr__(name):
    missing_attribute(__name__, name)
