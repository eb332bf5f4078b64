"""torchvision.ops: only ops.misc is named (see the package)."""
