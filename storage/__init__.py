"""The NVMe tier: checkpoint -> zarr weight store conversion and the raw-chunk reader."""

from storage.convert import open_or_convert, store_path
from storage.sources import open_source, read_source_config
from storage.store import TensorInfo, WeightStore

__all__ = ["open_or_convert", "store_path", "open_source", "read_source_config", "TensorInfo", "WeightStore"]
