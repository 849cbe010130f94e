"""Image-caption data: the synthetic default, caption tables, webdataset shards, and the DataModule."""
