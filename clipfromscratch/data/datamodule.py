"""One LightningDataModule for every caption source: the source is picked by its spec, batching is shared.

SPEC: `synthetic`, a caption table (`.tsv`, `.csv`), or webdataset shards (a `.tar`, a directory of them,
or a brace pattern): streamed for training, indexed for validation so that every sample counts once.
Tokenisation happens in the loader workers, in `Collate`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from transformers import PreTrainedTokenizerFast

from clipfromscratch.config import DataConfig
from clipfromscratch.data.shard_index import IndexedShards
from clipfromscratch.data.shards import CaptionShards
from clipfromscratch.data.specs import parse_data_spec, refuse
from clipfromscratch.data.synthetic import SyntheticCaptions
from clipfromscratch.data.transforms import image_transform
from clipfromscratch.data.tsv import CaptionTable
from clipfromscratch.errors import UsageError
from clipfromscratch.text_tokenizers import tokenize


def open_source(spec: str, split: str, *, seed: int, synthetic_samples: int, image_size: int,
                csv_img_key: str, csv_caption_key: str, csv_separator: str | None, stream: dict) -> Dataset:
    """The dataset a SPEC names, without an image transform yet; `stream`: CaptionShards options for training;
    `csv_separator` None: by the table's suffix."""
    data = parse_data_spec(spec)
    if data.kind == "synthetic" and not data.where:
        return SyntheticCaptions(split, synthetic_samples, seed, image_size)
    if data.kind == "table":
        return CaptionTable(spec, None, csv_img_key, csv_caption_key, csv_separator)
    if data.kind != "shards":
        raise refuse(data, f"{split} data", "captioned images: synthetic, a caption table or webdataset shards")
    if split == "train":
        return CaptionShards(spec, None, shuffle=True, seed=seed, **stream)
    return IndexedShards(spec, None)


class _Indexed(Dataset):
    """Tags each sample with its position, so validation can drop the duplicates a distributed sampler pads with."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict | None:
        sample = self.dataset[index]
        return None if sample is None else {**sample, "index": index}


class _Substituting(Dataset):
    """Training on a map-style source: an unreadable sample is replaced by the next readable one, so that every
    batch is full and no rank ever holds an empty one (under DDP every rank must reach every step's collectives)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        size = len(self.dataset)
        for offset in range(size):
            sample = self.dataset[(index + offset) % size]
            if sample is not None:
                return sample
        raise UsageError(f"none of the {size} training samples can be read any more")


class _Rereadable:
    """An iterable that starts over at each `iter()`: `read` returns a fresh iterator."""

    def __init__(self, read: Callable[[], Iterator[str]]):
        self.read = read

    def __iter__(self) -> Iterator[str]:
        return self.read()


class Collate:
    """Samples -> a batch dict; unreadable samples (None) are dropped, captions tokenised here in the worker."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, context_length: int):
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, samples: list[dict | None]) -> dict | None:
        samples = [s for s in samples if s is not None]
        if not samples:
            return None
        batch = {
            "pixels": torch.stack([s["pixels"] for s in samples]),
            "image_id": torch.tensor([s["image_id"] for s in samples], dtype=torch.long),
            "index": torch.tensor([s.get("index", -1) for s in samples], dtype=torch.long),
            **tokenize(self.tokenizer, [s["caption"] for s in samples], self.context_length),
        }
        if "labels" in samples[0]:
            batch["labels"] = {k: torch.tensor([s["labels"][k] for s in samples]) for k in samples[0]["labels"]}
        return batch


class CaptionDataModule(pl.LightningDataModule):
    """The training and validation loaders of a run: batches of images and tokenised captions for one model.

    Each of `config.train_data` and `config.validation_data` names a source (`open_source`): synthetic scenes, a
    caption table, or shards (streamed and shuffled for training, indexed for validation so every caption counts
    once); samples that data/samples.py's rule skips never reach a batch. `bind(model)` must come before the
    loaders: it sets the model's image transforms and tokenizer. A step's batch is `accum_freq` micro-batches of
    `config.batch_size` (feature-cached accumulation splits it again).
    """

    def __init__(self, config: DataConfig, image_size: int, seed: int, accum_freq: int = 1):
        super().__init__()
        self.train_data = config.train_data
        self.batch_size = config.batch_size * accum_freq
        self.num_workers = config.num_workers
        stream = {"shuffle_buffer": config.shuffle_buffer, "resampled": config.dataset_resampled,
                  "epoch_samples": config.train_num_samples, "batch_size": self.batch_size,
                  "num_workers": config.num_workers}
        common = {"seed": seed, "image_size": image_size, "csv_img_key": config.csv_img_key,
                  "csv_caption_key": config.csv_caption_key, "csv_separator": config.csv_separator, "stream": stream}
        self.train_set = open_source(config.train_data, "train", synthetic_samples=config.synthetic_train_samples,
                                     **common)
        val_data = config.validation_data
        self.val_set = None if val_data is None else open_source(
            val_data, "val", synthetic_samples=config.synthetic_val_samples, **common)
        self.collate: Collate | None = None

    def train_captions(self) -> Iterable[str]:
        """The training captions, to train a tokenizer on; they can be read more than once."""
        return _Rereadable(self.train_set.captions)

    @property
    def tokenizer_cache_dir(self) -> str | None:
        """Where a tokenizer trained on the training captions may be kept for other runs (shards only)."""
        return self.train_set.tokenizer_cache_dir() if isinstance(self.train_set, CaptionShards) else None

    @property
    def zeroshot_tasks(self) -> dict:
        """{task: (class names, prompt templates)} the validation set offers, e.g. colour and shape."""
        return getattr(self.val_set, "zeroshot_tasks", {})

    def check_training_data(self, world_size: int) -> None:
        """Before any work: the training data makes at least one full batch on each of `world_size` ranks (an
        epoch without a batch would repeat forever), and several readers of finite shards get an epoch size that
        keeps them in step. Every rank reaches the same verdict from the same files."""
        data, batch = self.train_set, self.batch_size
        need = f"one batch of {batch} per rank" + (f" ({world_size} ranks)" if world_size > 1 else "")
        if isinstance(data, CaptionShards):
            data.plan_epoch(world_size)
            found, skipped, unreadable = data.readable_samples(batch)
            if found < batch:
                why = [f"{unreadable} of {len(data.urls)} shards unreadable"] if unreadable else []
                why += [f"skipped {reason}: {n}" for reason, n in skipped.items()]
                raise UsageError(f"training data {self.train_data}: {found} readable samples, fewer than one batch "
                                 f"of {batch}" + (f" ({'; '.join(why)})" if why else ""))
            if data.epoch_samples is not None and data.epoch_samples < batch * world_size:
                raise UsageError(f"training data {self.train_data}: {data.epoch_samples} samples in an epoch, "
                                 f"fewer than {need}")
            return
        if math.ceil(len(data) / world_size) < batch:
            raise UsageError(f"training data {self.train_data}: {len(data)} usable samples, fewer than {need}: "
                             "lower --batch-size or add data")
        if isinstance(data, CaptionTable) and (readable := data.readable_rows(batch)) < batch:
            raise UsageError(f"training data {self.train_data}: {readable} of {len(data)} rows have an image that "
                             f"can be read, fewer than one batch of {batch}")

    def bind(self, model) -> None:
        """Preprocess images and tokenise captions the way `model` expects."""
        tower = model.image_tower
        # the synthetic data never repeats a sample: cropping it would only cost time and blur its positions
        augment = not isinstance(self.train_set, SyntheticCaptions)
        self.train_set.transform = (image_transform(tower.image_size, tower.mean, tower.std, train=True) if augment
                                    else model.preprocess)
        if self.val_set is not None:
            self.val_set.transform = model.preprocess
        self.collate = Collate(model.tokenizer, model.config.context_length)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        iterable = isinstance(dataset, IterableDataset)
        return DataLoader(
            dataset if iterable else _Substituting(dataset) if train else _Indexed(dataset),
            batch_size=self.batch_size,
            shuffle=train and not iterable,
            drop_last=train,  # a last tiny batch has too few negatives to be a useful contrastive step
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, train=False)
