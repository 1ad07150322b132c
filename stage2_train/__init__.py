"""Stage two: the DiT with its fusion gates, the cache data loader, training and sampling."""
