"""torchvision.transforms.functional, which open_clip imports and the tests never call."""
from torchvision import InterpolationMode, missing_attribute  # noqa: F401 (torchvision has it)


def __getattr__(name):
    missing_attribute(__name__, name)
