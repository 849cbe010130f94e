"""A caption table -> webdataset shards: `python data_prep/tsv_to_shards.py --input FILE --output DIR`."""
import sys

from clipfromscratch.prep.captioned import main

if __name__ == "__main__":
    sys.exit(main())
