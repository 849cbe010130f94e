"""Train a CLIP model from scratch: `python train.py --image-enc vit --text-enc bert` (see --help)."""
import sys

from clipfromscratch.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
