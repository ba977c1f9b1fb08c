"""What makes a model: the trainer and its data (synthetic heads, real captures), the default head builder and
parity tools. The serving runtime in `engine/` never imports this package (tests/test_architecture.py)."""
