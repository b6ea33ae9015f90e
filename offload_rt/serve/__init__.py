"""``offload-run serve``: an OpenAI-compatible HTTP server over one loaded model (continuous batching)."""
