"""The composition root: reads the config into typed settings, builds the task, tokenizer, encoder and scorer, calls the method."""
