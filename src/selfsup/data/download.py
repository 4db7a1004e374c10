"""Fetch a file over HTTP(S), verify its MD5, and only then give it its final name.

The bytes go to ``<name>.part`` first and are renamed atomically once the checksum matches, so
an interrupted or corrupted download never looks like a finished one, and a verified file is
never fetched twice.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from selfsup.data.cifar import ARCHIVE_NAME
from selfsup.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CHUNK_BYTES = 1 << 20


def file_md5(path: Path) -> str:
    """The MD5 hex digest of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)  # an integrity check, not security: fine on FIPS
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def download_verified(url: str, destination: Path, md5: str, *, timeout: float = 60.0, progress: bool = True) -> Path:
    """Download ``url`` to ``destination`` unless a file with the expected ``md5`` is already there.

    An existing file whose MD5 does not match (a truncated copy, say) is fetched again. A
    failed download or a checksum mismatch leaves neither ``destination`` nor the ``.part``
    file behind and raises :class:`DataError` naming the URL (and both checksums).
    """
    destination = Path(destination)
    if destination.is_file() and file_md5(destination) == md5.lower():
        return destination
    if not url.lower().startswith(("http://", "https://")):
        raise DataError(f"refusing to download {url!r}: only http:// and https:// URLs are fetched")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"downloading {destination.name}", disable=not progress,
            ) as bar:  # fmt: skip
                while chunk := response.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        actual = digest.hexdigest()
        if actual != md5.lower():
            raise DataError(f"download of {url} is corrupt: expected MD5 {md5.lower()}, got {actual}")
        os.replace(partial, destination)  # atomic on one file system: the final name means verified
    except DataError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DataError(f"download of {url} failed: {exc}") from exc
    finally:  # on any failure, Ctrl-C included; after the rename there is nothing left to remove
        partial.unlink(missing_ok=True)
    return destination


def download_cifar10(
    directory: Path, *, url: str | None = None, md5: str | None = None, progress: bool = True
) -> Path:
    """Fetch ``cifar-10-python.tar.gz`` into ``directory`` (verified; skipped when present).

    ``url`` and ``md5`` default to the module constants :data:`CIFAR10_URL` and
    :data:`CIFAR10_MD5`, read at call time so a mirror (or a test server) can stand in.
    """
    return download_verified(
        url if url is not None else CIFAR10_URL,
        Path(directory) / ARCHIVE_NAME,
        md5 if md5 is not None else CIFAR10_MD5,
        progress=progress,
    )
