"""ViTConfig: the one source of truth for a Vision Transformer's shape.

The model, the analytic parameter and FLOP counts, the memory planner, the
presets and the converters all read a `ViTConfig`; no shape constant is
written anywhere else. A config is plain data: it round-trips through
`to_dict` / `from_dict` (and so through JSON) without loss.
"""

import dataclasses
import math
import re

# name -> (width, depth, mlp_dim, num_heads): Scaling ViT (Zhai et al. 2022),
# Table 2; "e" is PaLI's ViT-e (Chen et al. 2022) and "22B" ViT-22B
# (Dehghani et al. 2023).
VARIANTS = {
    "mu": (32, 1, 128, 2),
    "s": (256, 6, 1024, 8),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
    # big_vision's shape-optimised ViT (Alabdulmohsin et al. 2023; SigLIP).
    "So400m": (1152, 27, 4304, 16),
    "e": (1792, 56, 15360, 16),
    "22B": (6144, 48, 24576, 48),
}

POOLINGS = ("tok", "gap", "map", "none")
POSEMBS = ("learn", "sincos2d", "none")
BLOCKS = ("sequential", "parallel", "vanilla")
GELUS = ("tanh", "exact")
NORM_POSITIONS = ("before_pool", "after_pool")
MLP_TYPES = ("gelu", "swiglu")


def parse_variant(variant):
    """Splits "B/16" into ("B", 16) and "mu" into ("mu", None).

    Args:
        variant: a name from `VARIANTS`, optionally followed by "/patch".

    Returns:
        (name, patch_size or None).
    """
    match = re.fullmatch(r"([A-Za-z0-9]+)(?:/(\d+))?", str(variant).strip())
    name = match.group(1) if match else None
    if name not in VARIANTS:
        raise ValueError(
            f"Unknown ViT variant {variant!r}. Known variants (case matters: "
            f"'g' is giant, 'G' is Gigantic): {', '.join(VARIANTS)}; add a "
            "patch size as in 'B/16'."
        )
    patch = int(match.group(2)) if match.group(2) else None
    return name, patch


def _pair(value, what):
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{what} must be an int or a pair (h, w); got {value!r}.")
        pair = (int(value[0]), int(value[1]))
    else:
        pair = (int(value), int(value))
    if min(pair) < 1:
        raise ValueError(f"{what} must be positive; got {value!r}.")
    return pair


def _nearest_multiples(value, step):
    lower = max(step, (value // step) * step)
    upper = lower + step if lower < value else lower
    return sorted({lower, upper})


@dataclasses.dataclass
class ViTConfig:
    """Every hyper-parameter that fixes a ViT's shape and numerics.

    Defaults follow big_vision (LayerNorm eps 1e-6, tanh GELU, zero head,
    position embedding added before the class token).

    Args:
        width: token dimension D.
        depth: number of encoder blocks.
        mlp_dim: hidden width of each MLP (after gating for "swiglu").
        num_heads: attention heads; must divide `width`.
        patch_size: int or (h, w) patch size.
        image_size: int or (h, w); each side divisible by the patch.
        num_classes: classifier outputs; 0 returns the pre-logits features.
        in_channels: image channels.
        pooling: "tok" (class token), "gap" (mean of tokens), "map"
            (multi-head attention pooling) or "none" (all tokens).
        class_token: prepend a learned class token. Defaults to True for
            `pooling="tok"` and False otherwise.
        posemb: "learn", "sincos2d" (fixed, big_vision's formula) or "none".
        posemb_covers_class_token: False adds the position embedding to the
            patch tokens before the prefix tokens (class, registers) are
            prepended (big_vision; timm's `no_embed_class=True`, DINOv2);
            True adds it after, so every prefix token has a position too
            (timm's default).
        num_register_tokens: learned register tokens (Darcet et al. 2024)
            placed after the class token: the sequence is [class,
            registers..., patches], as timm. Average pooling skips them.
        block: "sequential" (pre-LN), "parallel" (ViT-22B: one LayerNorm,
            attention and MLP side by side on fused projections) or
            "vanilla" (SimplEsT-ViT: no LayerNorm, no skip connections).
        pre_norm: a LayerNorm ("pre_norm") on the embedded tokens before the
            first block (OpenCLIP image towers; timm's `norm_pre`).
        layer_scale: LayerScale (CaiT, DINOv2) init value: each block's
            attention and MLP outputs are scaled per channel by learned
            vectors that start at this value; None for none. Sequential
            blocks only.
        mlp_type: "gelu" (Dense, GELU, Dense) or "swiglu" (timm's packed
            SwiGLU: the first projection gives 2 * mlp_dim outputs [a | b],
            the hidden units are silu(a) * b). Sequential blocks only.
        qk_norm: LayerNorm over each head's queries and keys.
        qkv_bias, attn_out_bias, mlp_bias, norm_bias, patch_bias, head_bias:
            bias switches (patch embedding and classifier head for the last
            two; OpenCLIP towers have neither).
        layer_norm_epsilon: LayerNorm epsilon.
        gelu: "tanh" (big_vision) or "exact" (timm, transformers).
        norm_position: final LayerNorm "before_pool" (big_vision) or
            "after_pool" (timm's `fc_norm` for average pooling).
        representation_size: optional tanh pre-logits layer width.
        head_zero_init: initialise the classifier kernel to zero.
        head_bias_init: classifier bias init (e.g. -10 for sigmoid training
            at JFT scale).
        dropout_rate: dropout after attention/MLP and before the head.
        remat: rematerialise each block's activations in the backward pass.

    Example:
    ```python
    cfg = ViTConfig.from_variant("B/16", num_classes=1000)
    cfg.count_params()  # 86,567,656 with a class token
    ```
    """

    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    patch_size: tuple = (16, 16)
    image_size: tuple = (224, 224)
    num_classes: int = 1000
    in_channels: int = 3
    pooling: str = "tok"
    class_token: bool = None
    posemb: str = "learn"
    posemb_covers_class_token: bool = False
    num_register_tokens: int = 0
    block: str = "sequential"
    pre_norm: bool = False
    layer_scale: float = None
    mlp_type: str = "gelu"
    qk_norm: bool = False
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    norm_bias: bool = True
    patch_bias: bool = True
    head_bias: bool = True
    layer_norm_epsilon: float = 1e-6
    gelu: str = "tanh"
    norm_position: str = "before_pool"
    representation_size: int = None
    head_zero_init: bool = True
    head_bias_init: float = 0.0
    dropout_rate: float = 0.0
    remat: bool = False
    variant: str = None

    def __post_init__(self):
        self.patch_size = _pair(self.patch_size, "patch_size")
        self.image_size = _pair(self.image_size, "image_size")
        if self.class_token is None:
            self.class_token = self.pooling == "tok"
        self.validate()

    # ---- construction -------------------------------------------------
    @classmethod
    def from_variant(cls, variant, **overrides):
        """Builds the config of a named variant such as "B/16" or "22B/14".

        Args:
            variant: a `VARIANTS` name with an optional "/patch" suffix.
            **overrides: any field of `ViTConfig`.
        """
        name, patch = parse_variant(variant)
        width, depth, mlp_dim, num_heads = VARIANTS[name]
        fields = dict(width=width, depth=depth, mlp_dim=mlp_dim,
                      num_heads=num_heads, variant=str(variant))
        if patch is not None:
            fields["patch_size"] = patch
        if "patch_size" in overrides and patch is not None:
            if _pair(overrides["patch_size"], "patch_size") != (patch, patch):
                raise ValueError(
                    f"variant {variant!r} fixes patch_size {patch}, but "
                    f"patch_size={overrides['patch_size']!r} was also given; "
                    f"pass variant={name!r} to choose the patch freely."
                )
        fields.update(overrides)
        return cls(**fields)

    def to_dict(self):
        """A JSON-serialisable dict of every field."""
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["image_size"] = list(self.image_size)
        return out

    @classmethod
    def from_dict(cls, data):
        """The inverse of `to_dict`; unknown keys are an error, not ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"Unknown ViTConfig field(s) {unknown}; known fields: "
                f"{sorted(known)}."
            )
        return cls(**data)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return self.from_dict({**self.to_dict(), **changes})

    # ---- validation ---------------------------------------------------
    def validate(self):
        """Raises ValueError naming the bad value and a fix."""
        for name, choices in (("pooling", POOLINGS), ("posemb", POSEMBS),
                              ("block", BLOCKS), ("gelu", GELUS),
                              ("norm_position", NORM_POSITIONS),
                              ("mlp_type", MLP_TYPES)):
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(
                    f"Unknown {name} {value!r}; choose one of {list(choices)}."
                )
        for name in ("width", "depth", "mlp_dim", "num_heads", "in_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got {value!r}.")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0; got {self.num_classes}.")
        if self.width % self.num_heads:
            divisors = [h for h in range(1, self.width + 1) if self.width % h == 0]
            near = sorted(divisors, key=lambda h: abs(h - self.num_heads))[:3]
            raise ValueError(
                f"width {self.width} is not divisible by num_heads "
                f"{self.num_heads}; use num_heads in {sorted(near)}."
            )
        for side, size, patch in zip(("height", "width"), self.image_size,
                                     self.patch_size):
            if size % patch:
                raise ValueError(
                    f"image_size {side} {size} is not divisible by patch_size "
                    f"{patch}; use one of {_nearest_multiples(size, patch)}."
                )
        if self.posemb == "sincos2d" and self.width % 4:
            raise ValueError(
                f"posemb 'sincos2d' needs width divisible by 4; width is "
                f"{self.width}. Use posemb='learn' or a width such as "
                f"{_nearest_multiples(self.width, 4)}."
            )
        if self.pooling == "tok" and not self.class_token:
            raise ValueError(
                "pooling 'tok' reads the class token, but class_token=False; "
                "set class_token=True or choose pooling 'gap' or 'map'."
            )
        registers = self.num_register_tokens
        if isinstance(registers, bool) or not isinstance(registers, int) or registers < 0:
            raise ValueError(
                f"num_register_tokens must be an integer >= 0; got {registers!r} "
                "(DINOv2 with registers uses 4)."
            )
        if self.posemb_covers_class_token and not self.num_prefix_tokens:
            raise ValueError(
                "posemb_covers_class_token=True gives the prefix tokens a position, "
                "but there are none: set class_token=True (or num_register_tokens "
                "> 0), or posemb_covers_class_token=False."
            )
        if self.posemb_covers_class_token and self.posemb == "sincos2d":
            raise ValueError(
                "posemb 'sincos2d' is a fixed table over the patch grid and has no "
                "entry for prefix tokens: set posemb_covers_class_token=False (or "
                "posemb='learn')."
            )
        self._validate_block_options()
        if self.block == "vanilla" and (self.pooling == "map" or self.class_token):
            raise ValueError(
                "block 'vanilla' (SimplEsT-ViT) attends over the patch grid only "
                "(E-SPA) and has no LayerNorm: use pooling='gap' (or 'none') "
                f"without a class token; got pooling={self.pooling!r}, "
                f"class_token={self.class_token}."
            )
        if not self.head_bias and self.head_bias_init:
            raise ValueError(
                f"head_bias_init={self.head_bias_init} initialises a head bias, but "
                "head_bias=False; set head_bias=True or head_bias_init=0.0."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1); got {self.dropout_rate}.")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(
                f"layer_norm_epsilon must be > 0; got {self.layer_norm_epsilon}."
            )

    def _validate_block_options(self):
        """The options only some blocks implement."""
        scale = self.layer_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                  or not scale > 0):
            raise ValueError(
                f"layer_scale must be a positive init value (timm's init_values, "
                f"e.g. 1e-5) or None for no LayerScale; got {scale!r}."
            )
        only_sequential = [f"{name}={value!r}" for name, value, off in (
            ("layer_scale", scale, None), ("mlp_type", self.mlp_type, "gelu"))
            if value != off]
        if only_sequential and self.block != "sequential":
            raise ValueError(
                f"{', '.join(only_sequential)} is implemented for block 'sequential' "
                f"only; got block={self.block!r}. Use block='sequential' or drop "
                "the option."
            )
        if self.block == "vanilla" and (self.num_register_tokens or self.pre_norm):
            raise ValueError(
                "block 'vanilla' (SimplEsT-ViT) has no LayerNorm and attends over the "
                "patch grid only: set num_register_tokens=0 and pre_norm=False; got "
                f"num_register_tokens={self.num_register_tokens}, "
                f"pre_norm={self.pre_norm}."
            )
        if self.mlp_type == "swiglu" and self.pooling == "map":
            # timm sizes its attention-pool MLP from the packed SwiGLU's
            # 2 * mlp_dim; refusing keeps one meaning for the MAP head's MLP.
            raise ValueError(
                "mlp_type 'swiglu' with pooling 'map' is not supported: the MAP "
                "head's MLP width is ambiguous for a gated model. Use pooling 'tok' "
                "or 'gap' with swiglu, or mlp_type 'gelu' with 'map'."
            )

    # ---- derived shapes -----------------------------------------------
    @property
    def head_dim(self):
        return self.width // self.num_heads

    @property
    def grid_size(self):
        """Patches along (height, width)."""
        return (self.image_size[0] // self.patch_size[0],
                self.image_size[1] // self.patch_size[1])

    @property
    def num_patches(self):
        return self.grid_size[0] * self.grid_size[1]

    @property
    def num_prefix_tokens(self):
        """Tokens before the patches: the class token, then the registers."""
        return int(self.class_token) + self.num_register_tokens

    @property
    def num_tokens(self):
        """Sequence length seen by the encoder, prefix tokens included."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def posemb_length(self):
        """Rows of the position embedding: the patches, plus the prefix tokens
        where `posemb_covers_class_token`."""
        covered = self.num_prefix_tokens if self.posemb_covers_class_token else 0
        return self.num_patches + covered

    @property
    def feature_dim(self):
        """Width of the pre-logits features."""
        return self.representation_size or self.width

    # ---- analytic counts ----------------------------------------------
    def parameter_shapes(self):
        """{variable path: shape} of every weight of the model, unbuilt.

        The paths are exactly `variable.path` of a built `kvs.ViT`, which a
        test checks; the parameter count, the memory planner and the
        converters read this instead of building a model.
        """
        d, m = self.width, self.mlp_dim
        shapes = {}

        def norm(prefix, dim, bias=self.norm_bias):
            shapes[f"{prefix}/gamma"] = (dim,)
            if bias:
                shapes[f"{prefix}/beta"] = (dim,)

        def dense(prefix, fan_in, fan_out, bias):
            shapes[f"{prefix}/kernel"] = (fan_in, fan_out)
            if bias:
                shapes[f"{prefix}/bias"] = (fan_out,)

        ph, pw = self.patch_size
        shapes["patch_embedding/kernel"] = (ph, pw, self.in_channels, d)
        if self.patch_bias:
            shapes["patch_embedding/bias"] = (d,)
        if self.class_token:
            shapes["class_token/token"] = (1, 1, d)
        if self.num_register_tokens:
            shapes["register_tokens/tokens"] = (1, self.num_register_tokens, d)
        if self.posemb == "learn":
            shapes["position_embedding/embedding"] = (1, self.posemb_length, d)
        if self.pre_norm:
            norm("pre_norm", d)
        # The packed SwiGLU's first projection holds the gate and the value.
        mlp_in = 2 * m if self.mlp_type == "swiglu" else m
        for i in range(self.depth):
            p = f"encoder_block_{i}"
            if self.block == "sequential":
                norm(f"{p}/norm_1", d)
                dense(f"{p}/attention/qkv", d, 3 * d, self.qkv_bias)
                dense(f"{p}/attention/out", d, d, self.attn_out_bias)
                if self.layer_scale is not None:
                    shapes[f"{p}/layer_scale_1/gamma"] = (d,)
                norm(f"{p}/norm_2", d)
                dense(f"{p}/mlp/dense_1", d, mlp_in, self.mlp_bias)
                dense(f"{p}/mlp/dense_2", m, d, self.mlp_bias)
                if self.layer_scale is not None:
                    shapes[f"{p}/layer_scale_2/gamma"] = (d,)
            elif self.block == "parallel":
                norm(f"{p}/norm", d)
                shapes[f"{p}/qkv_mlp_in/kernel"] = (d, 3 * d + m)
                if self.qkv_bias:
                    shapes[f"{p}/qkv_mlp_in/qkv_bias"] = (3 * d,)
                if self.mlp_bias:
                    shapes[f"{p}/qkv_mlp_in/mlp_bias"] = (m,)
                shapes[f"{p}/attn_mlp_out/kernel"] = (d + m, d)
                if self.attn_out_bias or self.mlp_bias:
                    shapes[f"{p}/attn_mlp_out/bias"] = (d,)
            else:  # vanilla: E-SPA attention (no output projection), 2 dense
                dense(f"{p}/attention/qkv", d, 3 * d, self.qkv_bias)
                dense(f"{p}/mlp/dense_1", d, m, self.mlp_bias)
                dense(f"{p}/mlp/dense_2", m, d, self.mlp_bias)
            if self.qk_norm and self.block != "vanilla":
                attn = f"{p}/attention" if self.block == "sequential" else p
                norm(f"{attn}/query_norm", self.head_dim)
                norm(f"{attn}/key_norm", self.head_dim)
        if self.block != "vanilla":
            norm("encoder_norm", d)
        if self.pooling == "map":
            shapes["map_head/probe"] = (1, 1, d)
            dense("map_head/query", d, d, True)
            dense("map_head/key_value", d, 2 * d, True)
            dense("map_head/out", d, d, True)
            norm("map_head/norm", d, True)
            dense("map_head/mlp/dense_1", d, m, True)
            dense("map_head/mlp/dense_2", m, d, True)
        if self.representation_size:
            dense("pre_logits", d, self.representation_size, True)
        if self.num_classes:
            dense("head", self.feature_dim, self.num_classes, self.head_bias)
        return shapes

    def count_params(self):
        """Number of parameters, equal to a built model's `count_params()`."""
        return sum(math.prod(s) for s in self.parameter_shapes().values())

    def flops_per_image(self):
        """Forward FLOPs for one image (a multiply-add counts as 2 FLOPs).

        Counts the matmuls and the attention products, as the Scaling ViT
        paper's Table 2 does; elementwise work (LayerNorm, LayerScale, the
        SwiGLU gate) is negligible at these sizes. Register tokens count as
        tokens.
        """
        d, m, n = self.width, self.mlp_dim, self.num_tokens
        ph, pw = self.patch_size
        macs = self.num_patches * ph * pw * self.in_channels * d
        attn_out = d if self.block != "vanilla" else 0
        mlp_in = 2 * m if self.mlp_type == "swiglu" else m
        per_block = n * (3 * d * d + attn_out * d + d * mlp_in + m * d)  # projections
        per_block += 2 * n * n * d                               # QK^T and AV
        macs += self.depth * per_block
        if self.pooling == "map":
            macs += d * d + n * 2 * d * d + 2 * n * d + d * d + 2 * d * m
        if self.representation_size:
            macs += d * self.representation_size
        macs += self.feature_dim * self.num_classes
        return 2 * macs
