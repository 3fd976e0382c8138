"""The composition root: reads the config into typed settings, builds the task, tokenizer, encoder and
scorer or generator, and calls the method; the command line and the dry run."""
