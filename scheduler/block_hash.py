"""Content hashes of full KV blocks, chained so a hash names a whole prefix.

A block's hash covers its parent's hash, its own token ids and an extra key
(the request's ``hash_salt``: the tenant, unless the client set a cache salt).
Two blocks share a hash only when everything before them matches too, and two
tenants never share a prefix unless they were given the same salt.

NOTE: sha256 rather than Python's ``hash``: the digest is the same in every
process, so a future shared or persisted cache can use it, and collisions are
not a practical concern (a collision would silently serve another prompt's KV).
"""
from __future__ import annotations

import hashlib
import struct
from typing import Sequence

BlockHash = bytes  # 32-byte sha256 digest

# Parent of a sequence's first block; fixed so every hash input has the same layout.
ROOT_HASH: BlockHash = hashlib.sha256(b"frugal-kv-root").digest()


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int], extra_key: str | None) -> BlockHash:
    """Hash one full block. Called once per block per request (hashes are kept)."""
    salt = b"" if extra_key is None else extra_key.encode()
    # Layout: parent (32 bytes) | salt length (u32) | salt | token ids (u32 each).
    # Length-prefixing the salt keeps salt and tokens from running into each other.
    data = (
        (ROOT_HASH if parent_hash is None else parent_hash)
        + struct.pack("<I", len(salt))
        + salt
        + struct.pack(f"<{len(token_ids)}I", *token_ids)
    )
    return hashlib.sha256(data).digest()


def hash_request_blocks(
    token_ids: Sequence[int], block_size: int, extra_key: str | None, parent_hash: BlockHash | None = None
) -> list[BlockHash]:
    """Hashes of every full block of ``token_ids``; a trailing partial block gets none."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent_hash = hash_block_tokens(parent_hash, token_ids[start:start + block_size], extra_key)
        hashes.append(parent_hash)
    return hashes
