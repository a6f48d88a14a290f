"""NIfTI in and out with geometry, and atomic writes of every output file."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from esegeta_engine.errors import OutputError, VolumeError, VolumeShapeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
GZIP_MAX_RATIO = 1100
"""Deflate expands at most ~1032-fold, so a ``.nii.gz`` of n bytes holds at most this times n."""


@dataclass
class Volume:
    """An image with its geometry.

    Attributes
    ----------
    data : np.ndarray
        float32 array in NIfTI axis order ``(x, y[, z][, c])``.
    affine : np.ndarray
        4x4 voxel-to-world (RAS+ mm) matrix.
    header : nib.Nifti1Header or None
        The source header (kept for writing results).
    path : Path or None
        Where it came from.
    """

    data: np.ndarray
    affine: np.ndarray
    header: Any = None
    path: Path | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size along each axis (mm), from the affine."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_nifti(path: str | Path) -> bool:
    """True if ``path`` has a NIfTI suffix."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def load_volume(path: str | Path, *, spatial_dims: int = 3, channels: int = 1) -> Volume:
    """Read a NIfTI image and check it can be a model input.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.
    spatial_dims : int
        3 for volumes; 2 for images (stored as ``(x, y)`` or ``(x, y, 1)``).
    channels : int
        Channels expected (a 4th axis of this length for 3D multi-channel).

    Raises
    ------
    VolumeError
        Missing or corrupt file, wrong dimensionality, NaN or Inf voxels.
    """
    path = Path(path)
    if not path.is_file():
        raise VolumeError(f"image file {str(path)!r} does not exist", "check the path")
    if not is_nifti(path):
        raise VolumeError(f"{path.name} is not a NIfTI file (.nii or .nii.gz)",
                          "convert it to NIfTI first (e.g. with dcm2niix for DICOM)")
    try:
        img = nib.load(str(path))
    except Exception as exc:
        raise VolumeError(f"{path.name} cannot be read as NIfTI ({exc.__class__.__name__}: {exc})",
                          "the file is corrupt or truncated; export it again") from None
    check_header(img, path)
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise VolumeError(f"{path.name} cannot be read as NIfTI ({exc.__class__.__name__}: {exc})",
                          "the file is corrupt or truncated; export it again") from None
    shape = data.shape
    # Drop trailing singleton axes beyond what is needed (x, y, 1) for 2D, (x, y, z, 1) for 3D.
    want = spatial_dims + (1 if channels > 1 else 0)
    while data.ndim > want and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != want or (channels > 1 and data.shape[-1] != channels):
        kind = f"{spatial_dims}D image" + (f" with {channels} channels" if channels > 1 else "")
        if data.ndim < spatial_dims:  # a 2D image for a 3D model: no channel axis is involved
            err = VolumeShapeError(f"{path.name} has shape {shape} but a {kind} was expected",
                                   f"give a {spatial_dims}D volume, or set preprocess.spatial_dims: {data.ndim} "
                                   f"if the model takes {data.ndim}D images")
        else:
            err = VolumeShapeError(
                f"{path.name} has shape {shape} but a {kind} was expected",
                "give a single 3D volume (split 4D time series / multi-echo files first), or set "
                "preprocess.spatial_dims / preprocess.in_channels to match the model",
            )
        err.channel_axis = data.ndim >= spatial_dims  # type: ignore[attr-defined]  # what a source's note is about
        raise err
    if min(data.shape[:spatial_dims]) < 2:
        raise VolumeError(f"{path.name} has shape {shape}: an axis has fewer than 2 voxels",
                          f"give a real {spatial_dims}D image")
    bad = ~np.isfinite(data)
    if bad.any():
        raise VolumeError(
            f"{path.name} has {int(bad.sum())} NaN or Inf voxel(s)",
            "fill or mask them (e.g. replace with 0) before explaining the model",
        )
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path)


def check_header(img: Any, path: Path) -> None:
    """Refuse what a NIfTI header says before any voxel is read.

    Complex and RGB voxels are not intensities; a header claiming more voxel
    bytes than the file can hold (a forged or truncated file) would make the
    reader allocate that much memory first; a singular or non-finite affine
    has no geometry to write results with.

    Raises
    ------
    VolumeError
        Naming the file and what its header says.
    """
    header = img.header
    dtype = header.get_data_dtype()
    if dtype.fields is not None:
        raise VolumeError(f"{path.name} holds RGB colour voxels ({', '.join(dtype.names)}), not intensities",
                          "convert it to one grey-value channel (or one file per channel) first")
    if dtype.kind == "c":
        raise VolumeError(f"{path.name} holds complex-valued voxels ({dtype}); the imaginary part would "
                          "be lost", "save the magnitude (or the real and imaginary parts as channels) first")
    shape = tuple(int(n) for n in header.get_data_shape())
    claimed = math.prod(shape) * dtype.itemsize + int(header.get_data_offset())
    size = path.stat().st_size
    limit = size * GZIP_MAX_RATIO if path.name.lower().endswith(".gz") else size
    if claimed > limit:
        raise VolumeError(f"{path.name} claims {shape} voxels ({claimed / 1e6:.1f} MB) but the file is "
                          f"{size} bytes, too small to hold them", "the file is truncated or its header is "
                          "wrong; export it again")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(f"{path.name} has a singular or non-finite affine (voxel to world matrix), "
                          "so it has no usable geometry", "fix the header's sform/qform (e.g. reset them "
                          "with fslorient or nibabel) and export it again")


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write ``path`` completely or not at all: yield a temporary path to write to.

    The temporary file has a unique name in the target folder
    (``.<name>.<random>.part<suffix>``, which :func:`~esegeta_engine.runguard.remove_part_files`
    recognises); it is renamed onto ``path`` when the block ends and removed when
    the block raises. An ``OSError`` (full disk, no rights) becomes one readable
    :class:`~esegeta_engine.errors.OutputError`.

    Examples
    --------
    >>> with atomic_write(out / "table.csv") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("a,b\n1,2\n")
    """
    path = Path(path)
    with _writing(path):
        parent = _mkdir(path.parent)
        suffix = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".part{suffix}", dir=parent)
        os.close(fd)
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; outputs are ordinary files
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def write_text(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_map(array: np.ndarray, like: Volume, path: str | Path, dtype: type = np.float32) -> Path:
    """Write ``array`` as NIfTI (float32 by default) with ``like``'s affine and header, atomically.

    The file appears complete or not at all (written to a temporary file in
    the same folder, then renamed).
    """
    path = Path(path)
    array = np.asarray(array, dtype=dtype)
    n_spatial = min(array.ndim, 3)
    spatial = like.data.shape[:n_spatial]
    if array.shape[:n_spatial] != spatial:
        raise ValueError(f"map shape {array.shape} does not match the volume grid {spatial}")
    header = like.header.copy() if like.header is not None else None
    img = nib.Nifti1Image(array, like.affine, header=header)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if header is None or int(header["sform_code"]) == 0:
        img.set_sform(like.affine, code=1)
    if header is None or int(header["qform_code"]) == 0:
        img.set_qform(like.affine, code=1)
    img.header["cal_min"], img.header["cal_max"] = 0, 0
    img.header["descrip"] = b"napari-esegeta attribution"
    with atomic_write(path) as tmp:
        nib.save(img, str(tmp))
    return path


def write_json(data: Any, path: str | Path) -> Path:
    """Write strict JSON atomically (temporary file + rename).

    NaN and infinities become ``null``: the file parses with any strict JSON
    parser.

    Raises
    ------
    OutputError
        The folder cannot be written (missing rights, full disk).
    """
    path = Path(path)
    text = json.dumps(finite_json(data), indent=2, default=_json_default, allow_nan=False) + "\n"
    return write_text(text, path)


def file_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, Inf) replaced by ``None``."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    return obj


def output_error(exc: OSError, path: str | Path) -> OutputError:
    """A readable :class:`OutputError` for a failed write of ``path``."""
    where = str(path)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"the disk is full: cannot write {where}",
                           "free some space or choose an output folder on another disk")
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        return OutputError(f"cannot write {where}: a file stands where a folder is needed",
                           "choose an output folder whose parents are folders")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {where}: {exc.strerror} (read-only, immutable or not yours)",
                           "choose an output folder you can write to")
    return OutputError(f"cannot write {where}: {exc.strerror or exc}", "choose another output folder")


class _writing:
    """Context manager turning an ``OSError`` of a write into an :class:`OutputError`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if isinstance(exc, OSError):
            raise output_error(exc, self.path) from None


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
