"""offload_rt: run LLMs larger than GPU memory or RAM, weights tiered across GPU, RAM and NVMe."""

from offload_rt import _folders

__version__ = "0.1.0"

_folders.install()  # storage, kernels_cpu, ... resolve to this offload_rt's folders (installed inside it)
