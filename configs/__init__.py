"""Data only: planner defaults and hardware presets (TOML), read by offload_rt.presets.

A package so that the TOML files install with ``offload_rt`` in a wheel (as ``offload_rt/configs``,
see pyproject.toml); offload_rt.presets finds them through ``offload_rt._folders.folder``.
"""
