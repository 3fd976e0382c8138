"""The one scorer, (examples, labels) -> label log-probs, on transformers, vLLM or an API; and text generators."""
