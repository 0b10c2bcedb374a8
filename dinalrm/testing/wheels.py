"""Tiny pure-Python wheels built in place, so tests can install stand-in packages offline through uv or pip."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from collections.abc import Mapping
from os import PathLike
from pathlib import Path


def build_wheel(folder: str | PathLike[str], distribution: str, version: str, files: Mapping[str, str]) -> Path:
    """Write `<name>-<version>-py3-none-any.whl` into `folder` holding `files` (path in the wheel -> source text).

    The wheel carries the METADATA, WHEEL and RECORD (with sha256 of every file) that installers check.
    """
    name = distribution.replace("-", "_")
    dist_info = f"{name}-{version}.dist-info"
    contents = {
        **files,
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: dinalrm.testing\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in contents.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = "\n".join(record) + "\n"
    wheel = Path(folder) / f"{name}-{version}-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in contents.items():
            archive.writestr(path, text)
    return wheel
