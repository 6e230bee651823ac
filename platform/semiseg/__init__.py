"""semiseg: hyperparameter studies of semi-supervised medical image segmentation.

The library lives under ``platform/semiseg`` (``platform/`` itself is deliberately not a
package: it would shadow Python's standard-library ``platform`` module).
"""

__version__ = "0.1.0"
