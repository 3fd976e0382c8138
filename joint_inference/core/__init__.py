"""The lowest layer: errors, small utilities, processes and devices, and the typed settings every layer receives."""
