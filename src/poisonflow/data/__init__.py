"""Dataset sources: config ``source:`` name → a module with ``load(spec)`` and ``describe(spec)``.

``load`` returns :class:`~poisonflow.data.base.DatasetArrays` (uint8 NHWC RGB images at
``image_size``, int64 labels, class names); ``describe`` returns the class names and the
per-class training counts without building images, for checking a config before any job runs.
"""

from ..kinds import SOURCES  # noqa: F401  (the registry, re-exported)

