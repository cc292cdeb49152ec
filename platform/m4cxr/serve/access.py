"""Optional API keys for the services.

Keys come from the services' args (`api_keys`: a list), a file (`api_keys_file`: one key per
line, `#` comments) and the environment variable M4CXR_API_KEYS (comma-separated). Each is kept
only as its SHA-256 hash: a config file may hold `sha256:<hex>` entries instead of keys, and the
replicas never see a key itself. With keys set, a request needs `Authorization: Bearer <key>`;
without keys, the services are open (as on 127.0.0.1 in the quickstart).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

ENV_VAR = "M4CXR_API_KEYS"


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def key_hashes(keys: list[str] | None = None, keys_file: str = "") -> list[str]:
    """The hashes of every configured key (args, file, environment); [] when there are none."""
    entries = list(keys or [])
    if keys_file:
        path = Path(keys_file)
        if not path.is_file():
            raise FileNotFoundError(f"api_keys_file {keys_file} does not exist")
        entries += [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    entries += [k.strip() for k in os.environ.get(ENV_VAR, "").split(",") if k.strip()]
    hashes = []
    for entry in entries:
        if entry.startswith("sha256:"):
            if len(entry) != 71 or any(c not in "0123456789abcdef" for c in entry[7:]):
                raise ValueError("an api_keys entry starting with 'sha256:' must be 64 lower-case hex digits")
            hashes.append(entry)
        else:
            hashes.append(hash_key(entry))
    return sorted(set(hashes))


def authorized(authorization: str | None, hashes: list[str]) -> bool:
    """Whether an Authorization header carries one of the keys (no keys: everyone is)."""
    if not hashes:
        return True
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return False
    offered = hash_key(key.strip())
    # compare with every hash, in constant time, so timing says nothing about which matched
    return sum(hmac.compare_digest(offered, h) for h in hashes) > 0
