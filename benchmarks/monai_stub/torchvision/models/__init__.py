"""``torchvision.models`` stand-in: only ``_utils`` (see the package docstring)."""

from . import _utils  # noqa: F401 (MONAI reaches it as torchvision.models._utils)
