"""Data layer: nnU-Net v2 and Decathlon datasets, validation, preprocessing and its Parquet
cache, phantom generation and case-level splits."""

from semiseg.data.cache import CachedDataset, CacheInfo, build_cache
from semiseg.data.dataset import CaseFiles, DatasetLayout, LoadedCase
from semiseg.data.errors import DatasetError
from semiseg.data.formats import read_dataset
from semiseg.data.layout import read_layout
from semiseg.data.phantom import generate_phantom, phantom_sites
from semiseg.data.preprocess import PreprocessSettings
from semiseg.data.splits import Split, make_split
from semiseg.data.validation import load_case, validate_layout
from semiseg.data.writer import write_case, write_dataset_json

__all__ = [
    "CacheInfo",
    "CachedDataset",
    "CaseFiles",
    "DatasetError",
    "DatasetLayout",
    "LoadedCase",
    "PreprocessSettings",
    "Split",
    "build_cache",
    "generate_phantom",
    "load_case",
    "make_split",
    "phantom_sites",
    "read_dataset",
    "read_layout",
    "validate_layout",
    "write_case",
    "write_dataset_json",
]
