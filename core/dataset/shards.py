"""WebDataset-style tar shards: byte-reproducible writing and a reader that needs only numpy.

A shard is a plain (ustar) tar file. Each sample is a group of consecutive members sharing a key
(``KEY.tif``, ``KEY.masks.npz``, ``KEY.json``), the convention of the WebDataset format
(https://github.com/webdataset/webdataset#the-webdataset-format), so WebDataset, torchdata or a
plain ``tarfile`` loop can read them. Every member has mtime 0, uid and gid 0, empty owner names
and mode 0644; the npz members have fixed zip timestamps; the JSON has sorted keys: the same
samples give the same bytes.
"""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from ..fileio import _json_default
# Imported where used, so that importing this module stays light: tifffile (heavy or optional third-party packages).

# Member order inside a sample (the extensions after the key).
MEMBER_ORDER = ("tif", "masks.npz", "json")
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest date a zip entry can hold


def tif_bytes(image: np.ndarray) -> bytes:
    """32-bit float TIFF (one page per leading index of a 3D stack), no date tag."""
    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ascontiguousarray(image, dtype=np.float32), photometric="minisblack")
    return buf.getvalue()


def npz_bytes(**arrays) -> bytes:
    """A compressed .npz (numpy.load reads it) whose bytes depend only on the arrays."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            a = io.BytesIO()
            np.lib.format.write_array(a, np.asarray(arrays[name]), allow_pickle=False)
            zf.writestr(info, a.getvalue())
    return buf.getvalue()


def json_bytes(data) -> bytes:
    return (json.dumps(data, sort_keys=True, indent=1, default=_json_default) + "\n").encode()


def tar_bytes(samples) -> bytes:
    """A shard from [(key, {ext: bytes})]: members in sample order, then ``MEMBER_ORDER``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for key, files in samples:
            if "." in key or "/" in key:
                raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
            exts = [e for e in MEMBER_ORDER if e in files] + sorted(set(files) - set(MEMBER_ORDER))
            for ext in exts:
                data = files[ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def decode_member(ext: str, data: bytes):
    """Decode one member: .tif -> float32 array, .npz -> dict of arrays, .json -> object."""
    if ext.endswith("tif") or ext.endswith("tiff"):
        import tifffile

        return tifffile.imread(io.BytesIO(data))
    if ext.endswith("npz"):
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if ext.endswith("json"):
        return json.loads(data.decode())
    return data


def shard_paths(path) -> list[Path]:
    """A shard file, or the sorted ``*.tar`` files of a folder (a dataset's ``shards/`` is used
    when ``path`` is the dataset folder)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if (p / "shards").is_dir():
        p = p / "shards"
    return sorted(q for q in p.glob("*.tar") if not q.name.startswith("."))


def iter_raw(path):
    """Yield (key, {ext: bytes}) per sample from one shard or a folder of shards, in order."""
    for shard in shard_paths(path):
        with tarfile.open(shard, mode="r") as tf:
            key, files = None, {}
            for m in tf:
                if not m.isfile():
                    continue
                k, _, ext = m.name.partition(".")
                if key is not None and k != key:
                    yield key, files
                    files = {}
                key = k
                files[ext] = tf.extractfile(m).read()
            if key is not None:
                yield key, files


def iter_samples(path, decode: bool = True):
    """Yield one dict per sample from a shard, a folder of shards or a dataset folder:
    ``key``, ``image`` (float32, (H, W) or (V, H, W) for biplanar pairs), ``masks`` (uint8,
    (S, H, W) or (V, S, H, W)) and ``mask_names`` when the dataset has masks, and ``meta`` (the
    sample's JSON: sampled parameters, geometry sidecars, 2D points). ``decode=False`` gives the
    raw bytes per extension instead."""
    for key, files in iter_raw(path):
        if not decode:
            yield {"key": key, **files}
            continue
        out = {"key": key}
        if "tif" in files:
            out["image"] = decode_member("tif", files["tif"])
        if "masks.npz" in files:
            z = decode_member("masks.npz", files["masks.npz"])
            out["masks"] = z["masks"]
            out["mask_names"] = [str(n) for n in z["names"]]
        if "json" in files:
            out["meta"] = decode_member("json", files["json"])
        yield out
