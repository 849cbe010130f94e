"""Fashion Product Images -> shards: `python data_prep/fashion.py --styles FILE --images DIR --output DIR`."""
import sys

from clipfromscratch.prep.fashion import main

if __name__ == "__main__":
    sys.exit(main())
