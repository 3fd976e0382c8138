"""Joint inference: unsupervised in-context learning and fine-tuning for (vision) language models."""
