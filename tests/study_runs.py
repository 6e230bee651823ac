"""Helpers of the tests that run study scripts and write hostile files (import as ``tests.study_runs``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_STARTED_EXIT = 77

_NO_RAY = """\
import os, runpy, sys
import ray

def _refuse(*args, **kwargs):
    sys.stderr.write("ray.init was called\\n")
    sys.stderr.flush()
    os._exit(%d)

ray.init = _refuse
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
""" % RAY_STARTED_EXIT


def run_study_without_ray(script: str | os.PathLike[str], *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run a study script as ``python script --storage-path TMP/runs ARGS...`` with Ray made unstartable.

    ``ray.init`` is replaced by a function that exits with status 77 (:data:`RAY_STARTED_EXIT`),
    so a study that got past its input checks shows as 77, and one refused before Ray as its own
    status (2 for input errors). Caches go to ``tmp_path / "cache"`` (``SEMISEG_CACHE``).

    Args:
        script: A path, or a file name under ``studies/`` (e.g. ``"ema_sweep.py"``).
        *args: Further command-line arguments.
        tmp_path: The test's temporary folder.

    Returns:
        The finished process, with ``stdout`` and ``stderr`` as text.
    """
    path = Path(script) if Path(script).is_file() else REPO / "studies" / script
    env = {**os.environ, "SEMISEG_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-c", _NO_RAY, str(path), "--storage-path", str(tmp_path / "runs"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO)


def write_oversized_nifti(path: Path, shape: tuple[int, ...] = (30000, 30000, 3000)) -> Path:
    """Write a tiny float32 NIfTI file whose header declares ``shape`` but which holds 16 voxels.

    A header as a corrupt or hostile file would carry it (oblique affine, mm units); gzip-compressed
    when ``path`` ends in ``.gz``. Reading its data would ask for ``prod(shape) * 4`` bytes.

    Returns:
        ``path``.
    """
    import gzip

    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape(shape)
    affine = np.array([[0.6, -0.35, 0.0, -12.0], [0.35, 0.6, 0.0, 4.5], [0.0, 0.0, 2.5, 30.0], [0, 0, 0, 1.0]])
    header.set_qform(affine, code=1)
    header.set_sform(affine, code=1)
    header.set_xyzt_units("mm")
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\x00" * 4 + np.arange(16, dtype=np.float32).tobytes()
    Path(path).write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)
    return Path(path)
