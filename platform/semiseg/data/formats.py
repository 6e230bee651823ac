"""Read a dataset folder in either layout semiseg knows: the one place that picks the reader.

``dataset.json`` tells the layout: a ``training`` list (and no ``channel_names``) is the
Medical Segmentation Decathlon layout (:mod:`semiseg.data.msd`); anything else is read as
nnU-Net v2 raw (:mod:`semiseg.data.layout`), whose reader also reports a missing or broken
``dataset.json``. Both return a :class:`~semiseg.data.dataset.DatasetLayout`.
"""

from __future__ import annotations

import os

from semiseg.data.dataset import DatasetLayout, check_root
from semiseg.data.layout import read_layout
from semiseg.data.msd import is_msd_json, read_msd


def read_dataset(
    root: str | os.PathLike[str], extra_unlabelled: str | os.PathLike[str] | None = None
) -> DatasetLayout:
    """Read a dataset in the nnU-Net v2 raw or the Medical Segmentation Decathlon layout.

    Args:
        root: The dataset folder (the one holding ``dataset.json``).
        extra_unlabelled: An optional folder of further unlabelled training
            images, named as in the dataset's own layout (nnU-Net:
            ``CASE_0000.nii.gz`` per channel; Decathlon: one ``CASE.nii.gz`` per
            case, 4D when multi-channel). They join ``training`` without labels.

    Returns:
        The dataset's layout, training cases sorted by id.

    Raises:
        DatasetError: Listing every problem of the layout, including case ids
            used more than once across imagesTr, imagesTs and the extra folder.
    """
    root = check_root(root)
    reader = read_msd if is_msd_json(root / "dataset.json") else read_layout
    return reader(root, extra_unlabelled)
