"""DATA: what a data spec names, read in this one place by training, evaluation and the compositional probes.

`synthetic` (or `synthetic:VARIANT`), `imagefolder:DIR`, `cifar10:ROOT`, `cifar100:ROOT`, `whatsup:FILE`,
`sugarcrepe:FILE`, `negbench:FILE`, `aro:FILE`, a caption table (by its suffix), and anything else webdataset
shards (a .tar, a directory, a brace pattern, a URL such as s3://... or pipe:...). Each reader takes the kinds
it can use and refuses the others in one line (`refuse`).
"""
from __future__ import annotations

from dataclasses import dataclass

from clipfromscratch.data.tsv import is_caption_table
from clipfromscratch.errors import UsageError

LABELLED = ("imagefolder", "cifar10", "cifar100")  # labels, no captions
PROBES = ("whatsup", "sugarcrepe", "negbench", "aro")  # compositional benchmarks' annotation files
PREFIXES = ("synthetic", *LABELLED, *PROBES)


@dataclass(frozen=True)
class DataSpec:
    text: str  # as the user wrote it
    kind: str  # "synthetic", one of LABELLED or PROBES, "table" or "shards"
    where: str  # the folder, root, file or shards; for synthetic, its variant ("" for none)


def parse_data_spec(spec: str) -> DataSpec:
    prefix, colon, rest = spec.partition(":")
    if spec == "synthetic" or (colon and prefix in PREFIXES):
        return DataSpec(spec, prefix, rest)
    return DataSpec(spec, "table" if is_caption_table(spec) else "shards", spec)


def refuse(spec: DataSpec, use: str, accepted: str) -> UsageError:
    """The one line for a spec of a kind a reader cannot use: what it is used for, and what it takes."""
    what = {"table": "a caption table", "shards": "shards", "synthetic": "synthetic data"}.get(spec.kind,
                                                                                              f"{spec.kind} data")
    return UsageError(f"{spec.text} is {what}: {use} takes {accepted}")
