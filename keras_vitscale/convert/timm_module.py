"""A live timm VisionTransformer <-> ViTConfig: its settings read, or one built.

`config_from_module` reads what a timm module computes (LayerNorm epsilon,
GELU flavour, pooling, position-embedding order, block kind, pre-encoder
norm, biases, LayerScale, register tokens, packed SwiGLU MLP) from its
submodules and refuses, listing them all, the options ViTConfig cannot
express: distillation tokens, a norm inside the patch embedding, attention
or MLP, gated attention, an attention pool other than timm's MAP head,
activations other than GELU (and SiLU in a packed SwiGLU).

`to_timm` goes the other way: a timm module of a config's layout, which
loads a converted state dict strictly and so judges a conversion.

Example:
```python
config = config_from_module(timm.create_model("vit_small_patch16_224"))
reference = to_timm(config)          # random weights, same layout
```
"""

import functools

from keras_vitscale.config import ViTConfig
from keras_vitscale.convert.timm_layout import unsupported_message

# timm's global_pool -> our pooling.
POOLINGS = {"token": "tok", "avg": "gap", "map": "map", "": "none"}


def config_from_module(module):
    """Reads a `ViTConfig` from a timm VisionTransformer module.

    Raises:
        TypeError: not a timm VisionTransformer.
        ValueError: listing every option the module uses that `ViTConfig`
            cannot express (distillation token, norm in the patch embedding,
            gated attention, ...).

    Example:
    ```python
    config_from_module(timm.create_model("vit_giant_patch14_reg4_dinov2"))
    # ViTConfig(..., num_register_tokens=4, layer_scale=1e-05, mlp_type='swiglu')
    ```
    """
    import torch.nn as nn
    from timm.layers import AttentionPoolLatent, Mlp, PatchEmbed
    from timm.models.vision_transformer import VisionTransformer

    m = module
    if not isinstance(m, VisionTransformer):
        raise TypeError(
            f"from_timm converts timm.models.VisionTransformer; got "
            f"{type(m).__module__}.{type(m).__name__}.")
    problems = []

    def need(ok, option):
        if not ok:
            problems.append(option)

    has_cls = m.cls_token is not None
    registers = m.num_reg_tokens if m.reg_token is not None else 0
    need(m.num_prefix_tokens == int(has_cls) + registers,
         "extra prefix tokens (e.g. DeiT's distillation token)")
    need(not m.dynamic_img_size, "dynamic_img_size=True")
    need(isinstance(m.norm_pre, (nn.Identity, nn.LayerNorm)),
         f"norm_pre {type(m.norm_pre).__name__} (only a LayerNorm before the encoder)")
    pe = m.patch_embed
    need(type(pe) is PatchEmbed and isinstance(pe.norm, nn.Identity)
         and not pe.dynamic_img_pad and pe.img_size is not None,
         "a patch embedding other than timm's PatchEmbed (embed_layer, embed_norm_layer, "
         "dynamic_img_pad or img_size=None)")
    if type(pe) is PatchEmbed and pe.img_size is not None:
        need(all(s % p == 0 for s, p in zip(pe.img_size, pe.patch_size)),
             f"img_size {tuple(pe.img_size)} not a multiple of patch_size "
             f"{tuple(pe.patch_size)} (timm's convolution drops the remainder)")
    need(m.global_pool in POOLINGS, f"global_pool={m.global_pool!r} (use one of "
         f"{sorted(POOLINGS)})")
    # Our average pool reads the patches only, as timm's does unless
    # pool_include_prefix; our MAP head attends over every token, timm's
    # over the patches unless pool_include_prefix.
    prefix = m.num_prefix_tokens
    need(not (prefix and m.global_pool == "avg" and m.pool_include_prefix),
         "pool_include_prefix=True with global_pool='avg' and prefix tokens")
    need(not (prefix and m.global_pool == "map" and not m.pool_include_prefix),
         "global_pool='map' with a class or register token (timm's pool skips the prefix "
         "tokens; the MAP head attends over every token)")
    need(not (isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity)),
         "final_norm=False (ViTConfig always has a final LayerNorm)")
    need(isinstance(m.head, (nn.Identity, nn.Linear)),
         f"head {type(m.head).__name__} (only nn.Linear, or none)")

    blocks = list(m.blocks)
    read = _parallel_blocks if _is_parallel(blocks[0]) else _sequential_blocks
    fields, norms, acts = read(blocks, m.embed_dim, need)
    if not fields:  # blocks of a kind with nothing more to read
        raise ValueError(unsupported_message(problems))
    if isinstance(m.norm_pre, nn.LayerNorm):
        norms.append(m.norm_pre)
    norm_bias = {getattr(n, "bias", None) is not None for n in norms}
    norms.append(m.fc_norm if isinstance(m.norm, nn.Identity) else m.norm)

    pool = m.attn_pool
    if m.global_pool == "map":
        need(type(pool) is AttentionPoolLatent and pool.latent_len == 1
             and pool.pos_embed is None and isinstance(pool.q, nn.Linear)
             and isinstance(pool.q_norm, nn.Identity) and pool.pool == "token"
             and pool.mlp is not None and type(pool.mlp) is Mlp
             and pool.latent_dim == m.embed_dim and pool.num_heads == fields["num_heads"]
             and pool.q.bias is not None and pool.kv.bias is not None
             and pool.mlp.fc1.out_features == fields["mlp_dim"],
             "an attention pool other than AttentionPoolLatent(latent_len=1, q_proj, "
             "qkv_bias, no qk_norm or pos_embed, the blocks' heads and MLP width)")
        if type(pool) is AttentionPoolLatent and pool.mlp is not None:
            norms.append(pool.norm)
            acts.append(pool.mlp.act)
    if problems:
        raise ValueError(unsupported_message(problems))

    # A packed-SwiGLU model without a MAP head has no GELU: timm's default.
    flavours = {_gelu_flavour(a) for a in acts} or {"exact"}
    eps = {getattr(n, "eps", None) for n in norms}
    layer_norms = all(isinstance(n, nn.LayerNorm) and n.elementwise_affine for n in norms)
    need(len(flavours) == 1 and None not in flavours,
         f"activation {sorted({type(a).__name__ for a in acts})} (only exact or tanh GELU, "
         "and SiLU in a packed SwiGLU MLP)")
    need(layer_norms, "a norm other than an affine nn.LayerNorm (e.g. RmsNorm)")
    need(len(eps) == 1, f"LayerNorms with different epsilons {sorted(eps)}")
    need(len(norm_bias) == 1, "LayerNorms with and without bias in one model")
    need(norm_bias != {False} or m.global_pool != "map",
         "bias-free LayerNorms with global_pool='map' (the MAP head's norm has a bias)")
    if problems:
        raise ValueError(unsupported_message(problems))

    pooling = POOLINGS[m.global_pool]
    posemb = "learn" if m.pos_embed is not None else "none"
    head = m.head if isinstance(m.head, nn.Linear) else None
    return ViTConfig(
        **fields, width=m.embed_dim, depth=len(blocks), patch_size=tuple(pe.patch_size),
        image_size=tuple(pe.img_size), num_classes=head.out_features if head else 0,
        in_channels=pe.proj.in_channels, pooling=pooling, class_token=has_cls,
        num_register_tokens=registers, posemb=posemb,
        posemb_covers_class_token=bool(m.num_prefix_tokens) and posemb == "learn"
        and not m.no_embed_class,
        pre_norm=isinstance(m.norm_pre, nn.LayerNorm), patch_bias=pe.proj.bias is not None,
        head_bias=head is None or head.bias is not None, norm_bias=norm_bias.pop(),
        layer_norm_epsilon=float(eps.pop()), gelu=flavours.pop(),
        norm_position="before_pool" if not isinstance(m.norm, nn.Identity) else "after_pool")


def _is_parallel(block):
    from timm.models.vision_transformer import ParallelScalingBlock

    return isinstance(block, ParallelScalingBlock)


def _blocks_of_kind(blocks, kind, name, need):
    """(where, block) for each block of class `kind`; any other is a problem."""
    for i, blk in enumerate(blocks):
        if type(blk) is kind:
            yield f"blocks.{i}", blk
        else:
            need(False, f"blocks.{i} is {type(blk).__name__}, not timm's {name} like blocks.0")


def _layer_scale(blk, where, need):
    """The block's LayerScale init value, or None; ls1 and ls2 must agree."""
    import torch.nn as nn
    from timm.layers import LayerScale

    kinds = {type(blk.ls1), type(blk.ls2)}
    if kinds == {nn.Identity}:
        return None
    values = {getattr(ls, "init_values", None) for ls in (blk.ls1, blk.ls2)}
    need(kinds == {LayerScale} and len(values) == 1 and None not in values,
         f"{where}.ls1/ls2 other than two timm LayerScale of one init value")
    return float(values.pop()) if len(values) == 1 and None not in values else None


def _mlp(mlp, where, need):
    """(mlp_type, inner width, activation) of timm's Mlp or packed SwiGLU."""
    import torch.nn as nn
    from timm.layers import GluMlp, Mlp

    if type(mlp) not in (GluMlp, Mlp):
        need(False, f"{where}.mlp is {type(mlp).__name__}, not timm's Mlp or SwiGLUPacked "
                    "(e.g. the unpacked SwiGLU's fc1_g/fc1_x)")
        return None, None, None
    need(isinstance(mlp.norm, nn.Identity)
         and (mlp.fc1.bias is None) == (mlp.fc2.bias is None),
         f"{where}.mlp has a norm inside (scale_mlp_norm) or a bias on one side only")
    if type(mlp) is GluMlp:
        need(not mlp.gate_last and isinstance(mlp.act, nn.SiLU) and mlp.chunk_dim == -1
             and mlp.fc1.out_features == 2 * mlp.fc2.in_features,
             f"{where}.mlp is a GluMlp other than timm's SwiGLUPacked (SiLU, gate first)")
        return "swiglu", mlp.fc2.in_features, None
    return "gelu", mlp.fc1.out_features, mlp.act


def _sequential_blocks(blocks, width, need):
    """(config fields, norms, activations) of timm pre-norm `Block`s."""
    import torch.nn as nn
    from timm.layers import Attention
    from timm.models.vision_transformer import Block

    norms, acts, layouts = [], [], set()
    if type(blocks[0]) is not Block:
        need(False, f"blocks.0 is {type(blocks[0]).__name__}, not timm's pre-norm Block or "
                    "ParallelScalingBlock")
        return {}, norms, acts
    attn0 = blocks[0].attn
    for where, blk in _blocks_of_kind(blocks, Block, "pre-norm Block", need):
        attn = blk.attn
        need(type(attn) is Attention and isinstance(attn.norm, nn.Identity)
             and getattr(attn, "gate", None) is None
             and attn.head_dim * attn.num_heads == width
             and attn.num_heads == attn0.num_heads,
             f"{where}.attn is not plain timm Attention (scale_attn_norm, gated, "
             "attn_head_dim or attn_layer)")
        mlp_type, mlp_dim, act = _mlp(blk.mlp, where, need)
        layouts.add((mlp_type, mlp_dim, _layer_scale(blk, where, need)))
        norms += [blk.norm1, blk.norm2]
        if not isinstance(getattr(attn, "q_norm", None), (nn.Identity, type(None))):
            norms += [attn.q_norm, attn.k_norm]
        if act is not None:
            acts.append(act)
    need(len(layouts) == 1, f"blocks differ in MLP or LayerScale: {sorted(layouts, key=str)}")
    mlp_type, mlp_dim, layer_scale = sorted(layouts, key=str)[0]
    fields = dict(
        block="sequential", mlp_type=mlp_type, mlp_dim=mlp_dim, layer_scale=layer_scale,
        num_heads=attn0.num_heads, qk_norm=not isinstance(attn0.q_norm, nn.Identity),
        qkv_bias=attn0.qkv.bias is not None, attn_out_bias=attn0.proj.bias is not None,
        mlp_bias=getattr(blocks[0].mlp.fc1, "bias", None) is not None
        if hasattr(blocks[0].mlp, "fc1") else True)
    return fields, norms, acts


def _parallel_blocks(blocks, width, need):
    """(config fields, norms, activations) of timm `ParallelScalingBlock`s.

    timm's block always has an MLP bias (in `in_proj.bias` or `mlp_bias`),
    so ours has one too; timm's qkv_bias and proj_bias map to ours.
    """
    import torch.nn as nn
    from timm.models.vision_transformer import ParallelScalingBlock

    def layout(blk):  # what must agree across blocks for one config to hold them
        fused = getattr(blk, "out_proj", None) is not None
        out = blk.out_proj if fused else blk.attn_out_proj
        return (blk.num_heads, blk.in_proj.out_features, blk.in_proj.bias is not None,
                out.bias is not None, fused, isinstance(blk.q_norm, nn.Identity))

    b0 = blocks[0]
    norms, acts = [], []
    for where, blk in _blocks_of_kind(blocks, ParallelScalingBlock, "ParallelScalingBlock",
                                      need):
        need(isinstance(blk.ls, nn.Identity),
             f"LayerScale in a ParallelScalingBlock ({where}.ls; ViTConfig has it for "
             "sequential blocks only)")
        need(blk.num_heads * blk.head_dim == width and layout(blk) == layout(b0),
             f"{where} differs from blocks.0 in heads, MLP width, biases, qk_norm or "
             "fuse_out_proj")
        norms.append(blk.in_norm)
        if not isinstance(blk.q_norm, nn.Identity):
            norms += [blk.q_norm, blk.k_norm]
        acts.append(blk.mlp_act)
    _, in_features, qkv_bias, out_bias, _, no_qk_norm = layout(b0)
    fields = dict(
        block="parallel", mlp_dim=in_features - 3 * width, num_heads=b0.num_heads,
        qk_norm=not no_qk_norm, qkv_bias=qkv_bias, attn_out_bias=out_bias, mlp_bias=True)
    return fields, norms, acts


def _gelu_flavour(act):
    import torch.nn as nn

    if isinstance(act, nn.GELU):
        return "tanh" if act.approximate == "tanh" else "exact"
    # timm's own activation classes (timm.layers.activations).
    if type(act).__module__.startswith("timm."):
        return {"GELU": "exact", "GELUTanh": "tanh"}.get(type(act).__name__)
    return None


def to_timm(config, fuse_out_proj=True):
    """A timm VisionTransformer with the layout of `config` (random weights).

    Used to check a converted state dict against timm itself; only configs
    that timm's ViT can express are accepted. Biases timm ties to other
    options (its patch embedding has a bias iff not pre_norm, its head
    always) are set afterwards to the config's.

    Args:
        config: a `ViTConfig`.
        fuse_out_proj: for block="parallel", one `out_proj` (True) or timm's
            separate `attn_out_proj` and `mlp_out_proj` (False).

    Example:
    ```python
    reference = to_timm(ViTConfig(..., num_register_tokens=4, mlp_type="swiglu"))
    reference.load_state_dict(state_dict, strict=True)
    ```
    """
    import timm.layers
    import torch
    import torch.nn as nn
    from timm.models.vision_transformer import Block, ParallelScalingBlock, VisionTransformer

    c = config
    pools = {v: k for k, v in POOLINGS.items()}
    # timm's Block has one bias switch for attention-out and MLP; its
    # ParallelScalingBlock always has an MLP bias.
    biases_ok = (c.attn_out_bias == c.mlp_bias if c.block == "sequential" else c.mlp_bias)
    if c.block not in ("sequential", "parallel") or c.representation_size or not biases_ok \
            or c.posemb == "sincos2d" or not c.norm_bias:
        raise ValueError("timm's VisionTransformer cannot express this config (block "
                         f"{c.block!r}, representation_size {c.representation_size}, "
                         f"posemb {c.posemb!r}, attn_out_bias {c.attn_out_bias} and "
                         f"mlp_bias {c.mlp_bias}, norm_bias {c.norm_bias}).")
    block_fn = Block if c.block == "sequential" else functools.partial(
        ParallelScalingBlock, fuse_out_proj=fuse_out_proj)
    swiglu = c.mlp_type == "swiglu"
    model = VisionTransformer(
        block_fn=block_fn, img_size=c.image_size, patch_size=c.patch_size,
        in_chans=c.in_channels, num_classes=c.num_classes, global_pool=pools[c.pooling],
        embed_dim=c.width, depth=c.depth, num_heads=c.num_heads,
        # SwiGLUPacked's hidden_features is its fc1 width: both halves.
        mlp_ratio=(2 if swiglu else 1) * c.mlp_dim / c.width,
        qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, proj_bias=c.attn_out_bias,
        init_values=c.layer_scale, class_token=c.class_token,
        reg_tokens=c.num_register_tokens, no_embed_class=not c.posemb_covers_class_token,
        pre_norm=c.pre_norm, pos_embed="learn" if c.posemb == "learn" else "none",
        fc_norm=c.norm_position == "after_pool",
        mlp_layer=timm.layers.SwiGLUPacked if swiglu else timm.layers.Mlp,
        act_layer=nn.SiLU if swiglu else "gelu" if c.gelu == "exact" else "gelu_tanh",
        norm_layer=functools.partial(timm.layers.LayerNorm, eps=c.layer_norm_epsilon),
        weight_init="skip")
    proj = model.patch_embed.proj
    if (proj.bias is not None) != c.patch_bias:
        proj.bias = nn.Parameter(torch.zeros(c.width)) if c.patch_bias else None
    if c.num_classes and not c.head_bias:
        model.head.bias = None
    return model
