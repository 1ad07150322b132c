"""What both stages use: manifests, the cache store, model loading, configuration."""
