"""Transport to a model behind an OpenAI-compatible API: requests, retries, the answer cache, request counting."""
