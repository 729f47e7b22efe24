"""Build-once cache for offline domains.

Rendering fonts or blending photos takes seconds; every later run should start at once. A cached
builder saves its :class:`DomainData` to ``cache_dir()/<name>-<version>.pt`` with an atomic write
(temp file + ``os.replace``), so concurrent runs never read half a file. The version string is part
of the file name: bump it whenever the builder's output changes and old caches are simply ignored.
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import torch

from dalab.utils import cache_dir

from .base import DomainData


def cache_path(name: str, version: str) -> Path:
    """Where the cached build of domain ``name`` at builder ``version`` lives."""
    return cache_dir() / f"{name}-{version}.pt"


def save_domain(data: DomainData, path: Path) -> None:
    """Write ``data`` to ``path`` atomically (readers see no file or the whole file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save({"images": data.images, "labels": data.labels, "classes": list(data.classes),
                    "split": data.split, "info": data.info}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_cached(path: Path) -> DomainData:
    d = torch.load(path, weights_only=True)
    return DomainData(d["images"], d["labels"], d["classes"], d["split"], d["info"])


def cached(version: str) -> Callable[[Callable[[], DomainData]], Callable[[], DomainData]]:
    """Decorate an offline builder (no arguments) so it builds once and then loads from the cache.

    Put it *under* ``@register_domain`` so the registered name stays the function's name. A cache
    file that cannot be read is rebuilt; a cache dir that cannot be written only costs a warning.
    """

    def deco(fn: Callable[[], DomainData]) -> Callable[[], DomainData]:
        @functools.wraps(fn)
        def build() -> DomainData:
            path = cache_path(fn.__name__, version)
            if path.is_file():
                try:
                    return load_cached(path)
                except Exception as e:  # truncated or from an incompatible torch: rebuild
                    warnings.warn(f"rebuilding {fn.__name__}: cannot read cache {path} ({e})", stacklevel=2)
            data = fn()
            try:
                save_domain(data, path)
            except OSError as e:
                warnings.warn(f"could not cache {fn.__name__} at {path} ({e}); set DALAB_CACHE", stacklevel=2)
            return data

        build.cache_version = version  # type: ignore[attr-defined]
        return build

    return deco
