"""Data layer: nnU-Net v2 raw datasets, phantom generation and case-level splits."""

from semiseg.data.errors import DatasetError
from semiseg.data.layout import (
    CaseFiles,
    DatasetLayout,
    LoadedCase,
    load_case,
    read_layout,
    validate_layout,
    write_case,
    write_dataset_json,
)
from semiseg.data.phantom import generate_phantom, phantom_sites
from semiseg.data.splits import Split, make_split

__all__ = [
    "CaseFiles",
    "DatasetError",
    "DatasetLayout",
    "LoadedCase",
    "Split",
    "generate_phantom",
    "load_case",
    "make_split",
    "phantom_sites",
    "read_layout",
    "validate_layout",
    "write_case",
    "write_dataset_json",
]
