"""open_clip's own CLIP (its ViT and text transformer, as in ViT-B-32) as a transformers CLIPModel and tokenizer.

The two are the same network under other names: a pre-norm ViT with a class token, a causal text transformer
pooled at its end-of-text token, projections without bias. The attention's packed input projection is split into
query, key and value; the projection matrices are transposed into linear layers. What transformers' CLIP cannot
express (attentional pooling, layer scale, pooling by anything but the class token, no pre-norm, a text tower
pooled elsewhere than at its end-of-text token, a projection with a bias) is refused in one line.

open_clip's BPE tokenizer becomes transformers' CLIPTokenizer over the same vocabulary and merges.
"""
from __future__ import annotations

from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from clipfromscratch.errors import UsageError

ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU": "gelu"}  # open_clip's module -> transformers' hidden_act


def is_native(model: nn.Module) -> bool:
    """Whether `model` is open_clip's CLIP class with its own ViT (not a timm or ModifiedResNet tower)."""
    from open_clip.model import CLIP as OpenClipCLIP
    from open_clip.transformer import VisionTransformer

    return isinstance(model, OpenClipCLIP) and isinstance(model.visual, VisionTransformer)


def _refuse(what: str) -> UsageError:
    return UsageError(f"--init openclip: {what}, which transformers' CLIP cannot hold")


def _check(model: nn.Module) -> None:
    visual = model.visual
    if visual.attn_pool is not None or visual.pool_type != "tok" or visual.final_ln_after_pool:
        raise _refuse(f"its image tower pools by {visual.pool_type}{' with attention' if visual.attn_pool else ''}")
    if isinstance(visual.ln_pre, nn.Identity):
        raise _refuse("its image tower has no norm before its transformer")
    if model.text_pool_type != "argmax":
        raise _refuse(f"its text tower pools by {model.text_pool_type}")
    blocks = [*visual.transformer.resblocks, *model.transformer.resblocks]
    if any(not isinstance(block.ls_1, nn.Identity) for block in blocks):
        raise _refuse("its blocks have layer scale")
    if not isinstance(model.text_projection, nn.Parameter) or visual.proj is None:
        raise _refuse("its projections are not plain matrices")


def _activation(model: nn.Module) -> str:
    name = type(model.visual.transformer.resblocks[0].mlp.gelu).__name__
    if name not in ACTIVATIONS:
        raise _refuse(f"its activation is {name}")
    return ACTIVATIONS[name]


def _tower_config(transformer: nn.Module, width: int, act: str) -> dict:
    block = transformer.resblocks[0]
    return dict(hidden_size=width, num_hidden_layers=len(transformer.resblocks),
                num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.c_fc.out_features,
                hidden_act=act, layer_norm_eps=block.ln_1.eps)


def _blocks(state: dict, source: str, target: str, count: int) -> dict:
    """open_clip residual blocks `source.{i}` -> transformers encoder layers `target.{i}`."""
    out = {}
    for i in range(count):
        s, t = f"{source}.{i}.", f"{target}.{i}."
        for name, q_k_v in (("weight", state[s + "attn.in_proj_weight"]), ("bias", state[s + "attn.in_proj_bias"])):
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), q_k_v.chunk(3)):
                out[f"{t}self_attn.{proj}.{name}"] = part
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                             ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for name in ("weight", "bias"):
                out[f"{t}{theirs}.{name}"] = state[f"{s}{ours}.{name}"]
    return out


def to_transformers(model: nn.Module, tokenizer) -> tuple[CLIPModel, CLIPTokenizer]:
    """open_clip's native `model` and its tokenizer as a transformers CLIPModel with the same weights."""
    _check(model)
    act, visual, state = _activation(model), model.visual, model.state_dict()
    hf_tokenizer = _tokenizer(tokenizer)
    width, text_width = visual.conv1.out_channels, model.token_embedding.embedding_dim
    config = CLIPConfig(
        vision_config=dict(_tower_config(visual.transformer, width, act), image_size=visual.image_size[0],
                           patch_size=visual.patch_size[0]),
        text_config=dict(_tower_config(model.transformer, text_width, act),
                         vocab_size=model.token_embedding.num_embeddings,
                         max_position_embeddings=model.positional_embedding.shape[0],
                         bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id,
                         pad_token_id=hf_tokenizer.pad_token_id),
        projection_dim=model.text_projection.shape[1])
    vision_layers, text_layers = len(visual.transformer.resblocks), len(model.transformer.resblocks)
    converted = {
        "logit_scale": state["logit_scale"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].t(),
        **{f"vision_model.{t}.{n}": state[f"visual.{s}.{n}"] for s, t in (("ln_pre", "pre_layrnorm"),
                                                                          ("ln_post", "post_layernorm"))
           for n in ("weight", "bias")},
        **{f"text_model.final_layer_norm.{n}": state[f"ln_final.{n}"] for n in ("weight", "bias")},
        **_blocks(state, "visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers),
        **_blocks(state, "transformer.resblocks", "text_model.encoder.layers", text_layers),
    }
    published = CLIPModel(config)
    missing, unexpected = published.load_state_dict(
        {k: v.detach().float().contiguous() for k, v in converted.items()}, strict=False)
    # position ids are buffers transformers makes itself
    if unexpected or any("position_ids" not in name for name in missing):
        raise UsageError(f"--init openclip: converting its weights left {missing[:3] + unexpected[:3]} unmatched")
    return published.eval(), hf_tokenizer


def _tokenizer(tokenizer) -> CLIPTokenizer:
    """open_clip's tokenizer as a transformers one: its BPE vocabulary and merges, or the HF tokenizer it wraps."""
    if hasattr(tokenizer, "tokenizer"):  # open_clip's HFTokenizer
        return tokenizer.tokenizer
    if not hasattr(tokenizer, "bpe_ranks"):
        raise UsageError(f"--init openclip: its tokenizer {type(tokenizer).__name__} has no BPE vocabulary to convert")
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    start, end = tokenizer.decoder[tokenizer.sot_token_id], tokenizer.decoder[tokenizer.eot_token_id]
    return CLIPTokenizer(vocab=dict(tokenizer.encoder), merges=list(merges), bos_token=start, eos_token=end,
                         unk_token=end, pad_token=end, model_max_length=tokenizer.context_length)
