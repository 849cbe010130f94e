"""COCO captions -> shards: `python data_prep/coco.py --annotations DIR --images DIR [--karpathy FILE] --output DIR`."""
import sys

from clipfromscratch.prep.coco import main

if __name__ == "__main__":
    sys.exit(main())
