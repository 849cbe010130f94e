"""Dataset preparation: raw downloads (COCO, Fashion Product Images, any caption table) -> webdataset shards."""
