"""Code shared by every script: typed configs, the data schema, tokenization, model loading."""
