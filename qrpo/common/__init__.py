"""Code shared by every script: typed configs, the data schema, tokenization, model loading,
the rewards (registry, reward model, code tests in the sandbox)."""
