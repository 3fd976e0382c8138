"""Templates, label sets and prompt encoders: an example (text or image fragment) and a label become tokens."""
