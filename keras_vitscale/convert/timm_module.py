"""A live timm VisionTransformer <-> ViTConfig: its settings read, or one built.

`config_from_module` reads what a timm module computes (LayerNorm epsilon,
GELU flavour, pooling, position-embedding order, block kind) from its
submodules and refuses, listing them all, the options ViTConfig cannot
express: LayerScale, register or distillation tokens, a norm inside the
patch embedding, attention or MLP, gated attention, an attention pool other
than timm's MAP head. OpenCLIP-style towers (timm's
`vit_giant_patch14_clip_224`, `..._clip_*`) use pre_norm=True, a LayerNorm on
the embedded tokens before the first block, which ViTConfig has no place
for; they are refused naming pre_norm rather than converted approximately.

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
        ValueError: listing every option the module uses that `ViTConfig`
            cannot express (LayerScale, register tokens, pre-norm, ...).
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
    need(m.reg_token is None, f"register tokens (reg_tokens={m.num_reg_tokens})")
    need(m.num_prefix_tokens == int(has_cls) + m.num_reg_tokens,
         "extra prefix tokens (e.g. DeiT's distillation token)")
    need(not m.dynamic_img_size, "dynamic_img_size=True")
    need(isinstance(m.norm_pre, nn.Identity),
         "pre_norm=True (norm_pre: a LayerNorm on the embedded tokens before the first "
         "block, as in OpenCLIP towers such as vit_giant_patch14_clip_224; ViTConfig has "
         "no such norm)")
    pe = m.patch_embed
    need(type(pe) is PatchEmbed and isinstance(pe.norm, nn.Identity)
         and pe.proj.bias is not None and not pe.dynamic_img_pad
         and pe.img_size is not None,
         "a patch embedding other than timm's PatchEmbed with a biased convolution "
         "(embed_layer, embed_norm_layer, pre_norm, dynamic_img_pad or img_size=None)")
    need(m.global_pool in POOLINGS, f"global_pool={m.global_pool!r} (use one of "
         f"{sorted(POOLINGS)})")
    need(not (m.pool_include_prefix and m.num_prefix_tokens),
         "pool_include_prefix=True with a class token")
    need(not (has_cls and m.global_pool == "map"),
         "class_token=True with global_pool='map' (timm's pool skips the class "
         "token; the MAP head attends over every token)")
    need(not (isinstance(m.norm, nn.Identity) and isinstance(m.fc_norm, nn.Identity)),
         "final_norm=False (ViTConfig always has a final LayerNorm)")
    need(isinstance(m.head, nn.Identity)
         or (isinstance(m.head, nn.Linear) and m.head.bias is not None),
         f"head {type(m.head).__name__} (only nn.Linear with bias, or none)")

    blocks = list(m.blocks)
    read = _parallel_blocks if _is_parallel(blocks[0]) else _sequential_blocks
    fields, norms, acts = read(blocks, m.embed_dim, need)
    block_bias = {n.bias is not None for n in norms}
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

    flavours = {_gelu_flavour(a) for a in acts}
    eps = {getattr(n, "eps", None) for n in norms}
    layer_norms = all(isinstance(n, nn.LayerNorm) and n.elementwise_affine for n in norms)
    need(len(flavours) == 1 and None not in flavours,
         f"activation {sorted({type(a).__name__ for a in acts})} (only exact or tanh GELU)")
    need(layer_norms, "a norm other than an affine nn.LayerNorm (e.g. RmsNorm)")
    need(len(eps) == 1, f"LayerNorms with different epsilons {sorted(eps)}")
    need(len(block_bias) == 1, "LayerNorms with and without bias in one model")
    need(block_bias != {False} or m.global_pool != "map",
         "bias-free LayerNorms with global_pool='map' (the MAP head's norm has a bias)")
    if problems:
        raise ValueError(unsupported_message(problems))

    pooling = POOLINGS[m.global_pool]
    posemb = "learn" if m.pos_embed is not None else "none"
    return ViTConfig(
        **fields, width=m.embed_dim, depth=len(blocks), patch_size=tuple(pe.patch_size),
        image_size=tuple(pe.img_size),
        num_classes=m.head.out_features if isinstance(m.head, nn.Linear) else 0,
        in_channels=pe.proj.in_channels, pooling=pooling, class_token=has_cls,
        posemb=posemb,
        posemb_covers_class_token=has_cls and posemb == "learn" and not m.no_embed_class,
        norm_bias=block_bias.pop(),
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


def _sequential_blocks(blocks, width, need):
    """(config fields, norms, activations) of timm pre-norm `Block`s."""
    import torch.nn as nn
    from timm.layers import Attention, Mlp
    from timm.models.vision_transformer import Block

    attn0, mlp0 = blocks[0].attn, blocks[0].mlp
    norms, acts = [], []
    for where, blk in _blocks_of_kind(blocks, Block, "pre-norm Block", need):
        need(isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity),
             f"LayerScale (init_values=..., {where}.ls1/ls2)")
        attn, mlp = blk.attn, blk.mlp
        need(type(attn) is Attention and isinstance(attn.norm, nn.Identity)
             and getattr(attn, "gate", None) is None
             and attn.head_dim * attn.num_heads == width
             and attn.num_heads == attn0.num_heads,
             f"{where}.attn is not plain timm Attention (scale_attn_norm, gated, "
             "attn_head_dim or attn_layer)")
        need(type(mlp) is Mlp and isinstance(mlp.norm, nn.Identity)
             and mlp.fc1.out_features == mlp0.fc1.out_features
             and (mlp.fc1.bias is None) == (mlp.fc2.bias is None),
             f"{where}.mlp is not timm's plain Mlp (mlp_layer or scale_mlp_norm)")
        norms += [blk.norm1, blk.norm2]
        if not isinstance(getattr(attn, "q_norm", None), nn.Identity):
            norms += [attn.q_norm, attn.k_norm]
        acts.append(getattr(mlp, "act", None))
    fields = dict(
        block="sequential", mlp_dim=mlp0.fc1.out_features, num_heads=attn0.num_heads,
        qk_norm=not isinstance(attn0.q_norm, nn.Identity),
        qkv_bias=attn0.qkv.bias is not None, attn_out_bias=attn0.proj.bias is not None,
        mlp_bias=mlp0.fc1.bias is not None)
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
        need(isinstance(blk.ls, nn.Identity), f"LayerScale (init_values=..., {where}.ls)")
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
    that timm's ViT can express are accepted.

    Args:
        config: a `ViTConfig`.
        fuse_out_proj: for block="parallel", one `out_proj` (True) or timm's
            separate `attn_out_proj` and `mlp_out_proj` (False).
    """
    import timm.layers
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
    return VisionTransformer(block_fn=block_fn,
        img_size=c.image_size, patch_size=c.patch_size, in_chans=c.in_channels,
        num_classes=c.num_classes, global_pool=pools[c.pooling], embed_dim=c.width,
        depth=c.depth, num_heads=c.num_heads, mlp_ratio=c.mlp_dim / c.width,
        qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, proj_bias=c.attn_out_bias,
        class_token=c.class_token, no_embed_class=not c.posemb_covers_class_token,
        pos_embed="learn" if c.posemb == "learn" else "none",
        fc_norm=c.norm_position == "after_pool",
        act_layer="gelu" if c.gelu == "exact" else "gelu_tanh",
        norm_layer=functools.partial(timm.layers.LayerNorm, eps=c.layer_norm_epsilon),
        weight_init="skip")
