"""Text towers built with transformers: a registered family (bert, gpt2) or any Hugging Face name or local path.

Every tower maps (B, L) token ids and attention mask -> (B, num_features) by a pooling rule:
`cls` (first token), `mean` (over real tokens) or `last` (last real token, for causal models).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, CLIPTextModel, PretrainedConfig

from clipfromscratch.encoders.registry import Registry, check_size
from clipfromscratch.errors import UsageError, first_line
from clipfromscratch.hf_modeling import pool

POOLINGS = ("cls", "mean", "last")


@dataclass(frozen=True)
class TextFamily:
    hub_name: str  # where `pretrained: true` loads weights and tokenizer from
    model_type: str  # transformers config type for from-scratch builds
    presets: dict[str, dict]  # size -> config fields over the model type's defaults
    pooling: str
    tokenizer_kind: str  # what `text_tokenizers.make_tokenizer` trains when not pretrained
    attention: str  # "bidirectional" or "causal": the mask the tower builds for SDPA itself (TextTower.attend)
    model_kwargs: dict = field(default_factory=dict)
    backbone_class: type = AutoModel  # what loads the published tower (a text tower inside a two-tower checkpoint)


TEXT_ENCODERS: Registry[TextFamily] = Registry(
    "text encoder", "any Hugging Face model name or local model directory (e.g. distilroberta-base)"
)
# The tiny presets drop dropout, as CLIP trains its towers: at this size it slowed learning badly (docs/training.md).
TEXT_ENCODERS.register("bert", TextFamily(
    hub_name="bert-base-uncased",
    model_type="bert",
    presets={
        "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512,
                     max_position_embeddings=128, vocab_size=8192, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0),
        "base": {},  # BertConfig defaults are bert-base-uncased
    },
    pooling="cls",
    tokenizer_kind="wordpiece",
    attention="bidirectional",
    # we pool [CLS] ourselves: an unused pooler makes DDP abort on parameters without gradients
    model_kwargs=dict(add_pooling_layer=False),
))
TEXT_ENCODERS.register("gpt2", TextFamily(
    hub_name="gpt2",
    model_type="gpt2",
    presets={
        "tiny": dict(n_embd=128, n_layer=2, n_head=2, n_positions=128, vocab_size=8192, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh"),
        # GPT2Config defaults are GPT-2 small; its gelu_new computed by one fused kernel instead of several ops
        "base": dict(activation_function="gelu_pytorch_tanh"),
    },
    # causal attention: only the last real token has seen the whole caption
    pooling="last",
    tokenizer_kind="bpe",
    attention="causal",
))
# CLIP's own text transformer (pre-norm, causal, a final norm), as OpenAI's models and `--init openai:` have it
TEXT_ENCODERS.register("clip_text", TextFamily(
    hub_name="openai/clip-vit-base-patch32",
    model_type="clip_text_model",
    presets={
        "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=77, vocab_size=8192),
        "base": {},  # CLIPTextConfig defaults: the text tower of OpenAI's ViT-B models
    },
    # its last real token is the end-of-text token, which CLIP pools (after the final norm)
    pooling="last",
    tokenizer_kind="bpe",
    attention="causal",
    backbone_class=CLIPTextModel,
))


class TransformersTower(nn.Module):
    """What every tower around a transformers backbone (`self.backbone`) shares: layer groups and checkpointing."""

    backbone: nn.Module

    def layer_groups(self) -> list[list[nn.Parameter]]:
        """The tower's parameters by layer, from the input up: the embeddings, then each transformer layer (the
        final norm, if any, with the last). The layers are the backbone's longest module list (BERT's
        `encoder.layer`, GPT-2's `h`, CLIP's `encoder.layers`, and the like in other Hugging Face models)."""
        lists = [m for m in self.backbone.modules() if isinstance(m, nn.ModuleList)]
        if not lists:
            raise UsageError(f"tower {type(self.backbone).__name__} has no list of layers to group")
        layers = max(lists, key=len)
        owner = {id(p): 1 + i for i, layer in enumerate(layers) for p in layer.parameters()}
        groups: list[list[nn.Parameter]] = [[] for _ in range(1 + len(layers))]
        after_layers = False  # parameters registered after the layers (a final norm) join the last layer
        for p in self.backbone.parameters():
            after_layers = after_layers or id(p) in owner
            groups[owner.get(id(p), len(layers) if after_layers else 0)].append(p)
        return groups

    def enable_grad_checkpointing(self) -> None:
        non_reentrant = {"use_reentrant": False}  # works under DDP and with inputs that need no gradient
        try:
            if hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers 5 (the other is deprecated)
                self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=non_reentrant)
            else:
                self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=non_reentrant)
        except ValueError as err:
            raise UsageError(f"{type(self.backbone).__name__}: {err}") from None


class TextTower(TransformersTower):
    """A transformers backbone plus a pooling rule: (B, L) ids, mask -> (B, num_features).

    `attention` ("bidirectional", "causal", None for a model of no registered family) is the backbone's kind of
    attention, for which the tower builds the 4D mask itself (`attend`)."""

    def __init__(self, backbone: nn.Module, pooling: str, attention: str | None = None):
        super().__init__()
        if pooling not in POOLINGS:
            raise UsageError(f"unknown text pooling '{pooling}': choose one of {', '.join(POOLINGS)}")
        self.backbone = backbone
        self.pooling = pooling
        self.attention = attention
        self.num_features: int = backbone.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return pool(self.forward_tokens(input_ids, attention_mask), attention_mask, self.pooling)

    def architecture(self) -> dict:
        """What rebuilds the tower offline with random weights (saved with every checkpoint and export, read back
        by `build_text_tower`): its backbone's transformers config."""
        return self.backbone.config.to_dict()

    @property
    def max_positions(self) -> int | None:
        """The longest caption in tokens it can read; None for relative positions (no limit)."""
        return getattr(self.backbone.config, "max_position_embeddings", None)

    def forward_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) ids, mask -> (B, L, num_features): the state of every position (padding's too)."""
        return self.backbone(input_ids=input_ids, attention_mask=self.attend(attention_mask)).last_hidden_state

    def attend(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The mask handed to the backbone: for SDPA attention of a known kind, the 4D boolean mask (True: attend)
        built here, (B, 1, 1, L) or causal (B, 1, L, L); else the (B, L) mask as it is. From a (B, L) mask,
        transformers reads the mask back to the host at every forward pass to see whether it has padding (a sync
        that stalls a GPU every step); a 4D mask it takes as it is."""
        if self.attention is None or getattr(self.backbone.config, "_attn_implementation", None) != "sdpa":
            return attention_mask
        keys = attention_mask.bool()[:, None, None, :]
        if self.attention == "bidirectional":
            return keys
        length = attention_mask.size(1)
        return torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril() & keys


def text_family(name: str) -> TextFamily | None:
    """The registered family of `name`, None for a Hugging Face name or path; unknown local-looking paths fail."""
    family = TEXT_ENCODERS.get(name)
    if family is None and (name.startswith((".", "/", "~")) and not os.path.isdir(os.path.expanduser(name))):
        raise UsageError(f"text encoder directory not found: {name}")
    return family


def pretrained_source(name: str) -> str:
    """Hub name or local path that pretrained weights and tokenizer come from."""
    family = text_family(name)
    return family.hub_name if family is not None else os.path.expanduser(name)


def _hub_error(what: str, source: str, err: Exception) -> UsageError:
    return UsageError(
        f"cannot load {what} '{source}' (offline, or not a Hugging Face model?): {first_line(err)}"
    )


def text_config(name: str, size: str, overrides: dict, vocab_size: int, special_ids: dict) -> PretrainedConfig:
    """The architecture to build from scratch, with the vocabulary of the tokenizer it is trained with."""
    family = text_family(name)
    fields = dict(overrides, vocab_size=vocab_size, **special_ids)
    if family is not None:
        try:
            return AutoConfig.for_model(family.model_type, **{**family.presets[check_size(size)], **fields})
        except Exception as err:  # noqa: BLE001 - transformers validates fields with errors of several types
            detail = " ".join(line.strip() for line in str(err).splitlines())
            raise UsageError(f"bad text_overrides {json.dumps(overrides)} for {family.model_type}: {detail}") from None
    try:
        return AutoConfig.from_pretrained(pretrained_source(name), **fields)
    except (OSError, ValueError) as err:
        raise _hub_error("the config of", name, err) from None


def build_text_tower(name: str, pooling: str | None, pretrained: bool, config: PretrainedConfig | None) -> TextTower:
    """Published weights of `name` when pretrained, else random weights for `config` (from `text_config`)."""
    family = text_family(name)
    model_kwargs = family.model_kwargs if family is not None else {}
    backbone_class = family.backbone_class if family is not None else AutoModel
    pooling = pooling or (family.pooling if family is not None else "mean")
    if pretrained:
        source = pretrained_source(name)
        try:
            backbone = backbone_class.from_pretrained(source, **model_kwargs)
        except (OSError, ValueError) as err:
            raise _hub_error("pretrained text tower", source, err) from None
    else:
        try:
            backbone = AutoModel.from_config(config, **model_kwargs)
        except (ValueError, TypeError, RuntimeError) as err:
            raise UsageError(f"text tower {name} cannot be built from its config: {first_line(err)}") from None
    return TextTower(backbone, pooling, family.attention if family is not None else None)
