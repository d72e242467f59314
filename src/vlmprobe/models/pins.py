"""`vlmprobe pin ENTRY`: pin a hub entry to its repo's current commit, in the project's pins.yaml.

The registry applies `pins.yaml` (`{entry: {revision: <40-hex>}}`) over the entries' own
`weights.revision`, so pinning never edits the installed package. The hub is asked through
huggingface_hub (`HfApi().model_info`), which honours HF_ENDPOINT and HF_HUB_OFFLINE.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from vlmprobe.errors import VlmprobeError
from vlmprobe.models.registry import (
    PINS_FILE,
    REVISION,
    RegistryEntry,
    RegistryError,
    entries,
    read_pins,
)

PINS_HEADER = (
    "# Hub revisions pinned by `vlmprobe pin ENTRY` (entry -> {revision: <40-hex commit>}).\n"
    "# The registry applies them over the entries' own weights.revision; edit with care.\n"
)


class HubUnreachable(VlmprobeError, RuntimeError):
    """No hub answered (offline mode, or no connection); the message is one line."""


def hub_entry(name: str) -> RegistryEntry:
    """The registry entry `name`, which must load from the hub."""
    known = entries()
    hub = sorted(n for n, e in known.items() if e.weights.get("source") == "hub")
    if name not in known or known[name].weights.get("source") != "hub":
        what = "unknown" if name not in known else f"a {known[name].weights.get('source')} entry"
        raise RegistryError(f"cannot pin {name!r}: {what}, not a hub entry. Hub entries: "
                            f"{', '.join(hub)}. Fix: `vlmprobe pin <one of those>`.")
    return known[name]


def current_revision(repo_id: str) -> str:
    """The commit the hub's default branch of `repo_id` is at now."""
    # Imported here: `vlmprobe validate` and friends must not pay for huggingface_hub.
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.constants import ENDPOINT, is_offline_mode
    from huggingface_hub.errors import OfflineModeIsEnabled

    if is_offline_mode():
        raise HubUnreachable(f"offline (HF_HUB_OFFLINE=1): cannot resolve {repo_id}'s current "
                             "commit; unset HF_HUB_OFFLINE where a hub is reachable")
    try:
        sha = HfApi().model_info(repo_id, timeout=30).sha
    except (OfflineModeIsEnabled, httpx2.TransportError) as e:
        raise HubUnreachable(f"offline: no hub at {ENDPOINT} answered ({type(e).__name__}); "
                             f"cannot resolve {repo_id}'s current commit") from e
    if not isinstance(sha, str) or not REVISION.match(sha):
        raise RegistryError(f"the hub at {ENDPOINT} gave {repo_id} commit {sha!r}, not a 40-hex "
                            "sha. Fix: check HF_ENDPOINT points at a Hugging Face hub.")
    return sha


def write_pin(pins_file: Path, name: str, revision: str) -> None:
    """Record `name`'s pin in `pins_file`, keeping the other pins (entries sorted)."""
    pins = {**read_pins(pins_file), name: revision}
    body = yaml.safe_dump({n: {"revision": r} for n, r in sorted(pins.items())}, sort_keys=False)
    pins_file.write_text(PINS_HEADER + body)


def pin_entry(name: str, project_root: Path) -> str:
    """Pin entry `name` to its hub repo's current commit; the line saying what changed."""
    entry = hub_entry(name)
    repo_id = entry.weights["repo_id"]
    old = entry.weights.get("revision")
    new = current_revision(repo_id)
    write_pin(project_root / PINS_FILE, name, new)
    return f"pinned {name} ({repo_id}): {old} -> {new} in {project_root / PINS_FILE}"
