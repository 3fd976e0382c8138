"""Unsupervised fine-tuning of a vision-language model (paper Table 3): not implemented yet."""
import sys

if __name__ == "__main__":
    sys.exit("unsupervised_ft_vlm.py is not implemented yet: vision support is planned (see the README roadmap).")
