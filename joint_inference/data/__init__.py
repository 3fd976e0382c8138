"""Datasets: the hub's rows, local files in its schema, the user's own files, images; the protocol's sample."""
