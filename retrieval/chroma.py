"""Chroma client factory: embedded PersistentClient under the data dir, or HttpClient for `chroma run`."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from kernel.errors import CatalogError


def make_chroma_client(*, data_dir: Path, chroma_url: str | None):
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    chroma_settings = ChromaSettings(anonymized_telemetry=False)
    if chroma_url:
        u = urlparse(chroma_url)
        if not u.hostname:
            raise CatalogError(f"ADSELECT_CHROMA_URL is not a URL: {chroma_url!r}")
        try:
            return chromadb.HttpClient(
                host=u.hostname,
                port=u.port or (443 if u.scheme == "https" else 8000),
                ssl=u.scheme == "https",
                settings=chroma_settings,
            )
        except Exception as e:  # chromadb raises plain exceptions when the server is unreachable
            raise CatalogError(f"cannot reach Chroma at {chroma_url}: {e}") from e
    path = Path(data_dir) / "chroma"
    path.mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(path), settings=chroma_settings)
