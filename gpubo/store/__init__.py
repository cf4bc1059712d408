"""The swap-slot store: where evicted buffer objects' bytes live.

:class:`LmdbStore` keeps every entry in one LMDB environment, memory-mapped
with ``writemap`` and preallocated at creation. The store only holds bytes and
accounts for its space; which BO owns an entry is the manager's business.
"""

from gpubo.store.lmdb_store import CHUNK_BYTES, Entry, LmdbStore

__all__ = ["CHUNK_BYTES", "Entry", "LmdbStore"]
