"""The statistics cache: a folder of small HDF5 entry files, one per key, that plain ``h5py`` opens.

``format`` is the entry file (schema, digest checked before HDF5 parses it); ``store`` is the folder
(names, lock, atomic writes, removal, export). The layout is documented in docs/cache-format.md.
"""

from .format import (
    SCHEMA_VERSION,
    CacheEntry,
    CacheError,
    CacheWarning,
    NewerEntryError,
    NotAnEntryError,
)
from .store import (
    check_key,
    default_cache_dir,
    delete_entries,
    entry_name,
    export_entry,
    is_entry_file,
    list_entries,
    prune_entries,
    read_entry,
    write_entry,
)

__all__ = [
    "SCHEMA_VERSION", "CacheEntry", "CacheError", "CacheWarning", "NewerEntryError", "NotAnEntryError",
    "check_key", "default_cache_dir", "delete_entries", "entry_name", "export_entry", "is_entry_file",
    "list_entries", "prune_entries", "read_entry", "write_entry",
]
