"""Image-text data: manifests, WebDataset shards, training datasets, filters and the synthetic generator."""
