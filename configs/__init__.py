"""Data only: planner defaults and hardware presets (TOML), read by offload_rt.presets.

A package so that the TOML files install next to ``offload_rt`` in a wheel, keeping
``Path(offload_rt.__file__).parents[1] / "configs"`` valid for every kind of install.
"""
