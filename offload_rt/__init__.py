"""offload_rt: run LLMs larger than GPU memory or RAM, weights tiered across GPU, RAM and NVMe."""

__version__ = "0.1.0"
