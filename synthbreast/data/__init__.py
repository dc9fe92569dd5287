"""Image folders and WebDataset shards: demo data, ingest, the shard schema and reader."""
