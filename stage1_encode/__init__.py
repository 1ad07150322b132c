"""Stage one: run the frozen LLM and VAE once over a dataset and write chunked caches."""
