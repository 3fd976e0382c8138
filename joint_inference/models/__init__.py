"""Loading models: causal LMs (hub, local, embedded GGUF, tiny random), vision-language models, vLLM engines."""
