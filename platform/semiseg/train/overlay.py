"""A prediction overlay: image | ground truth | prediction, for one validation case."""

from __future__ import annotations

import io

import numpy as np

GROUND_TRUTH_COLOUR = np.array([1.0, 0.15, 0.15])
PREDICTION_COLOUR = np.array([0.1, 0.9, 0.2])


def overlay_png(image: np.ndarray, label: np.ndarray, prediction: np.ndarray, scale: int = 3) -> bytes:
    """Render the slice with the most foreground as a PNG of three panels.

    Args:
        image: ``[C, X, Y, Z]`` (the first channel is shown).
        label: ``[X, Y, Z]`` ground truth.
        prediction: ``[X, Y, Z]`` predicted labels.
        scale: pixel repetition (nearest) so small phantoms stay readable.

    Returns:
        PNG bytes: image, image with the ground truth in red, image with the prediction in green.

    Raises:
        ValueError: shapes disagree.
    """
    from PIL import Image

    if label.shape != prediction.shape or image.shape[1:] != label.shape:
        raise ValueError(f"overlay shapes differ: image {image.shape}, label {label.shape}, "
                         f"prediction {prediction.shape}")
    z = int(np.argmax((label > 0).sum(axis=(0, 1))))
    gray = image[0, :, :, z].astype(np.float64)
    low, high = np.percentile(gray, [1, 99])
    gray = np.clip((gray - low) / max(high - low, 1e-6), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    panels = [rgb, _tint(rgb, label[:, :, z] > 0, GROUND_TRUTH_COLOUR), _tint(rgb, prediction[:, :, z] > 0,
                                                                            PREDICTION_COLOUR)]
    canvas = np.concatenate([np.pad(np.rot90(p), ((2, 2), (2, 2), (0, 0)), constant_values=1.0) for p in panels],
                            axis=1)
    canvas = np.kron(canvas, np.ones((scale, scale, 1)))
    buffer = io.BytesIO()
    Image.fromarray((canvas * 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tint(rgb: np.ndarray, mask: np.ndarray, colour: np.ndarray) -> np.ndarray:
    tinted = rgb.copy()
    tinted[mask] = 0.45 * tinted[mask] + 0.55 * colour
    return tinted
