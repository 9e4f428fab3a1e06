"""The cache: the contract between stage one (precompute) and stage two (train).

One Zarr v3 group per cache with sharded arrays (see docs/cache-format.md). This package
imports neither torch-heavy stage: `CacheWriter` writes whole shards only, `Cache` reads.
"""

from clip2scene.storage.reader import Cache, ScanData, open_cache
from clip2scene.storage.schema import SCHEMA_VERSION
from clip2scene.storage.store import Location, parse_storage_options
from clip2scene.storage.writer import CacheWriter, Layout, ScanRecord, write_block

__all__ = ["Cache", "CacheWriter", "Layout", "Location", "ScanData", "ScanRecord", "SCHEMA_VERSION", "open_cache",
           "parse_storage_options", "write_block"]
