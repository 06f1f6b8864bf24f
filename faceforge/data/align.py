"""Face alignment: the ArcFace 5-point template, scaled to any crop size.

The five landmarks are, in order: left eye centre, right eye centre, nose tip, left mouth corner,
right mouth corner (left/right as seen in the image). Coordinates are pixels ``(x, y)`` of a
112x112 crop, as in insightface's ``arcface_dst``. A similarity-transform aligner (5 detected
points -> template) belongs in this module too; it is not written yet.
"""

from __future__ import annotations

import numpy as np

TEMPLATE_SIZE = 112

# insightface `arcface_dst`: (x, y) in a 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],  # left eye
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
ARCFACE_TEMPLATE.setflags(write=False)


def template_for_size(size: int) -> np.ndarray:
    """The ArcFace template for a square ``size x size`` crop: ``ARCFACE_TEMPLATE * size / 112``.

    Returns a new float64 array ``(5, 2)`` of ``(x, y)`` pixel coordinates. The face fills the crop
    in the same proportion as at 112 (insightface scales the template the same way).
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"size must be a positive int (pixels), got {size!r}")
    return ARCFACE_TEMPLATE * (float(size) / TEMPLATE_SIZE)
