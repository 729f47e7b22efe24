"""Build-once cache for offline domains.

Rendering fonts or blending photos takes seconds; every later run should start at once. A cached
builder saves its :class:`DomainData` to ``cache_dir()/<name>-<version>.pt`` with an atomic write
(temp file + ``os.replace``, with the permissions the umask gives), so concurrent runs never read
half a file. The version string is part of the file name: bump it whenever the builder's output
changes and old caches are simply ignored.

A cache file carries the identity of what it holds -- the domain's name, the builder version and a
content hash (:func:`~dalab.datasets.base.fingerprint`) -- and is used only when all three match
the domain asked for: a file copied or renamed to another domain's name, or damaged, is rebuilt
(with a warning), never used silently. Files from before the identity was stored are rebuilt once.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Callable

import torch

from dalab.utils import cache_dir, temp_file

from .base import DomainData, fingerprint


def cache_path(name: str, version: str) -> Path:
    """Where the cached build of domain ``name`` at builder ``version`` lives."""
    return cache_dir() / f"{name}-{version}.pt"


def save_domain(data: DomainData, path: Path, name: str = "", version: str = "") -> None:
    """Write ``data`` to ``path`` atomically (readers see no file or the whole file), with its
    identity: domain ``name``, builder ``version`` and content fingerprint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    try:
        torch.save({"images": data.images, "labels": data.labels, "classes": list(data.classes),
                    "split": data.split, "info": data.info,
                    "identity": {"name": name, "version": version, "fingerprint": fingerprint(data)}}, tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_cached(path: Path, name: str | None = None, version: str | None = None) -> DomainData:
    """The domain cached in ``path``; ValueError unless it is domain ``name`` at ``version`` (when
    given) and its content still matches its fingerprint."""
    d = torch.load(path, weights_only=True)
    data = DomainData(d["images"], d["labels"], d["classes"], d["split"], d["info"])
    ident = d.get("identity")
    if name is not None or version is not None:
        if not isinstance(ident, dict):
            raise ValueError("it predates the identity check (no name, version or content hash stored)")
        if (ident.get("name"), ident.get("version")) != (name, version):
            raise ValueError(f"it holds domain {ident.get('name')!r} {ident.get('version')}, "
                             f"not {name!r} {version}")
    if isinstance(ident, dict):
        fp = fingerprint(data)
        if fp != ident.get("fingerprint"):
            raise ValueError(f"its content ({fp}) does not match its fingerprint ({ident.get('fingerprint')})")
    return data


def cached(version: str) -> Callable[[Callable[[], DomainData]], Callable[[], DomainData]]:
    """Decorate an offline builder (no arguments) so it builds once and then loads from the cache.

    Put it *under* ``@register_domain`` so the registered name stays the function's name. A cache
    file that cannot be read, or holds another domain, another version or altered content, is
    rebuilt; a cache dir that cannot be written only costs a warning.
    """

    def deco(fn: Callable[[], DomainData]) -> Callable[[], DomainData]:
        @functools.wraps(fn)
        def build() -> DomainData:
            name = fn.__name__
            path = cache_path(name, version)
            if path.is_file():
                try:
                    return load_cached(path, name, version)
                except Exception as e:  # truncated, from an incompatible torch, another domain's: rebuild
                    warnings.warn(f"rebuilding {name}: cannot use cache {path} ({e})", stacklevel=2)
            data = fn()
            try:
                save_domain(data, path, name, version)
            except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
                warnings.warn(f"could not cache {name} at {path} ({e}); set DALAB_CACHE", stacklevel=2)
            return data

        build.cache_version = version  # type: ignore[attr-defined]
        return build

    return deco
