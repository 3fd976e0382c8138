"""Unsupervised in-context learning with a vision-language model (paper Table 3): not implemented yet."""
import sys

if __name__ == "__main__":
    sys.exit("unsupervised_icl_vlm.py is not implemented yet: vision support is planned (see the README roadmap).")
