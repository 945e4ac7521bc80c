"""Where an index's embeddings came from: the checkpoint that produced them (path and sha256).

``EmbeddingIndexWriter`` records it in the manifest (``info["model"]``); ``lightning-metric
search`` compares a checkpoint it is given with it, and the writer compares it before it
replaces an index. A path alone proves nothing: ``best.ckpt`` is rewritten by every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

__all__ = ["checkpoint_mismatch", "checkpoint_record", "file_sha256", "unverified"]

_CHUNK = 1 << 22


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes, read in 4 MiB chunks into one reused buffer
    (checkpoints and index files can be many GB). ``sha256sum`` prints the same."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while size := f.readinto(buffer):
            digest.update(buffer[:size])
    return digest.hexdigest()


def checkpoint_record(ckpt_path: Optional[str | Path], weights: str) -> dict[str, Any]:
    """``{"checkpoint", "checkpoint_sha256", "weights"}`` for a manifest: the resolved path and
    hash of a local checkpoint file (``None`` for both without one; the hash alone is ``None``
    for a path that is not a local file, e.g. a URL), and ``weights``, a sentence saying where
    the weights came from."""
    if ckpt_path is None:
        return {"checkpoint": None, "checkpoint_sha256": None, "weights": weights}
    path = Path(ckpt_path)
    if path.is_file():
        return {
            "checkpoint": str(path.resolve()),
            "checkpoint_sha256": file_sha256(path),
            "weights": weights,
        }
    return {"checkpoint": str(ckpt_path), "checkpoint_sha256": None, "weights": weights}


def _short(sha: str) -> str:
    return sha[:12]


def checkpoint_mismatch(recorded: Mapping[str, Any], new: Mapping[str, Any]) -> Optional[str]:
    """Why embeddings from ``new`` (a :func:`checkpoint_record`) may not match the index whose
    manifest records ``recorded`` (its ``info["model"]``); ``None`` when they come from the
    same checkpoint.

    Same hash: same checkpoint. An index from a release that recorded no hash is accepted only
    for the same resolved path (unverifiable, see :func:`unverified`); no recorded checkpoint
    at all (untrained or in-process weights) never matches a checkpoint.
    """
    old_path, old_sha = recorded.get("checkpoint"), recorded.get("checkpoint_sha256")
    new_path, new_sha = new.get("checkpoint"), new.get("checkpoint_sha256")
    if new_path is None:
        return (
            f"the index holds embeddings of checkpoint {old_path!r}, the new ones come from no "
            f"checkpoint ({new.get('weights', 'weights of unknown origin')})"
            if old_path is not None
            else "neither the index nor the new embeddings come from a checkpoint, so they "
            "cannot be shown to come from the same model"
        )
    if old_path is None:
        weights = recorded.get("weights") or "no provenance recorded (an older release?)"
        return (
            f"the index records no checkpoint ({weights}), so checkpoint {new_path!r} cannot "
            "be shown to be the model that produced it"
        )
    if old_sha is not None and new_sha is not None:
        if old_sha == new_sha:
            return None
        return (
            f"the index was built from checkpoint {old_path!r} (sha256 {_short(old_sha)}...), "
            f"but checkpoint {new_path!r} has sha256 {_short(new_sha)}...: another model"
        )
    if Path(old_path).resolve() == Path(new_path).resolve():
        return None
    return (
        f"the index was built from checkpoint {old_path!r} (no sha256 recorded) and the "
        f"checkpoint given is {new_path!r}"
    )


def unverified(recorded: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    """Whether :func:`checkpoint_mismatch` accepted ``new`` by path alone (no hash to compare)."""
    return recorded.get("checkpoint_sha256") is None or new.get("checkpoint_sha256") is None
