"""Model families, dispatched on config.json's ``model_type``."""

from offload_rt.models import llama

# model_type -> module implementing LlamaArgs-style config + layer_forward/head_forward.
REGISTRY = {mt: llama for mt in llama.FAMILIES}


def family(model_type: str):
    """The module implementing ``model_type`` (raises a user error listing what is supported)."""
    mod = REGISTRY.get(model_type)
    if mod is None:
        llama.LlamaArgs.from_config({"model_type": model_type})  # raises the one-line error
    return mod
