"""Analytic memory and FLOP estimate of a ViT training step.

`estimate()` answers "does ViT-X with optimizer Y and batch Z fit on my
accelerators?" from the `ViTConfig` alone, without building the model:

- parameters and gradients: `cfg.parameter_shapes()` in `param_dtype`
  (gradients have their parameter's dtype, as in Keras and JAX);
- optimizer state: the real slot shapes and dtypes, from each optimizer's
  `state_specs` (Adam: two float32 slots; BF16Adam: bfloat16 momentum +
  float32 velocity; ScalingAdafactor: bfloat16 momentum + row/column second
  moment vectors for tensors whose second-largest dim is >= 32, a full
  float32 second moment otherwise; SGD without momentum: nothing);
- activations: what the backward pass needs saved, counted per block below;
- FLOPs: 3x the forward pass per step (forward, and a backward of twice the
  forward), 4x in hardware FLOPs with rematerialisation (one more forward).

What a pre-LN block saves for backward (per example, n tokens, width d,
MLP width m, h heads; this is Korthikanti et al. 2022's accounting without
dropout masks). Each matmul keeps its input, each nonlinearity its input:
  the LN1 input, the QKV matmul input (LN1 output)             2 n d
  q, k (for q k^T) and v (for probs @ v)                        3 n d
  softmax output (h n^2, kept in float32: the softmax runs in float32)
  attention output (input of the output projection)              n d
  the LN2 input and the MLP input (LN2 output)                  2 n d
  the GELU input and the second matmul input (GELU output)      2 n m
i.e. 8 n d + 2 n m elements + 4 h n^2 bytes. The parallel (ViT-22B) block
saves 6 n d + 2 n m (one LN, fused projections), the vanilla block
(SimplEsT-ViT) 7 n d + 2 n m (no LN, no output projection, a second
activation after the MLP). qk-norm adds q and k before their LN (2 n d).
The packed SwiGLU MLP saves its first matmul's output (2 n m), the gate's
activation (n m) and the second matmul input (n m): 4 n m instead of 2 n m.
LayerScale keeps each branch output for its gradient (2 n d); the
pre-encoder LayerNorm keeps its input (n d, outside the blocks). Register
tokens count as tokens (n includes every prefix token).
With rematerialisation (Keras `RematScope`, one checkpoint per block) only
each block's input (n d) is kept, and one block's full set is rebuilt at a
time during the backward pass.

Under a mesh {"data": a, "fsdp": b, "model": c}: the batch is split over
a * b devices; matrices (parameters, their gradients and optimizer slots)
are sharded over b * c devices while vectors (biases, norms) stay
replicated; q, k, v, attention probabilities and MLP hidden units are split
over the c model-parallel devices (Megatron-style heads / MLP columns), the
width-d tensors are replicated across them.

Not counted: framework workspace (cuDNN/XLA scratch, fragmentation),
dropout masks, the bfloat16 copies of float32 weights that mixed precision
makes inside each matmul, collective-communication buffers.
`benchmarks/memory_validation.py` compares this with XLA's own numbers (its
section of benchmarks/RESULTS.md): parameters and optimizer state match XLA's
argument sizes exactly, while XLA keeps more elementwise intermediates than
the minimal set above as temporaries, so leave headroom for gradients and
activations until the benchmark has been run on the target accelerator.
"""

import dataclasses
import functools
import math

from keras_vitscale.config import VARIANTS
from keras_vitscale.config import ViTConfig
from keras_vitscale.mesh_spec import MESH_AXES, parse_mesh  # noqa: F401  (kvs.memory.MESH_AXES, kept for callers)
from keras_vitscale.planning.byte_sizes import format_bytes, parse_bytes

OPTIMIZERS = ("adam", "bf16_adam", "scaling_adafactor", "sgd")
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
# Softmax probabilities are computed and kept in float32 (see layers/attention.py).
SOFTMAX_BYTES = 4


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes and FLOPs of one training step, in total and per device.

    Attributes:
        config: the `ViTConfig` estimated.
        batch_size: global batch; `device_batch_size` is its share per device.
        optimizer, param_dtype, compute_dtype, remat, mesh: the inputs.
        num_params: parameter count.
        params, gradients, optimizer_state, activations: total bytes over
            all devices (activations for the global batch).
        activations_no_remat, activations_remat: both variants of the total.
        activations_per_block: bytes one block saves per example (no remat).
        per_device: {"params", "gradients", "optimizer_state", "activations",
            "total"} bytes on one device under the mesh.
        flops_per_step: model FLOPs of one step (3x forward, global batch).
        hardware_flops_per_step: with remat's extra forward (4x).

    Example:
    >>> est = kvs.planning.estimate("G/14", batch_size=8, optimizer="scaling_adafactor")
    >>> est.per_device["total"] / 2**30, est.fits("80GiB")
    >>> print(est)
    """

    config: ViTConfig
    batch_size: int
    device_batch_size: int
    optimizer: str
    param_dtype: str
    compute_dtype: str
    remat: bool
    mesh: dict
    num_params: int
    params: int
    gradients: int
    optimizer_state: int
    activations: int
    activations_no_remat: int
    activations_remat: int
    activations_per_block: int
    per_device: dict
    flops_per_step: float
    hardware_flops_per_step: float

    @property
    def num_devices(self):
        return math.prod(self.mesh.values())

    def fits(self, device_memory):
        """Whether `per_device["total"]` fits in `device_memory` (bytes or "16GiB")."""
        return self.per_device["total"] <= parse_bytes(device_memory)

    def table(self):
        """A plain-text breakdown, total and per device."""
        rows = [("params", self.params, "params"), ("gradients", self.gradients, "gradients"),
                ("optimizer state", self.optimizer_state, "optimizer_state"),
                ("activations", self.activations, "activations")]
        mesh = ",".join(f"{k}:{v}" for k, v in self.mesh.items())
        lines = [
            f"ViT {self.config.variant or ''} {self.config.image_size[0]}px, "
            f"{self.num_params / 1e6:.1f}M params, batch {self.batch_size} "
            f"({self.device_batch_size} per device), {self.optimizer}, params "
            f"{self.param_dtype}, compute {self.compute_dtype}, "
            f"remat={self.remat}, mesh {mesh}",
            f"{'':16} {'total':>12} {'per device':>12}",
        ]
        for name, total, key in rows:
            lines.append(f"{name:16} {format_bytes(total):>12} "
                         f"{format_bytes(self.per_device[key]):>12}")
        lines.append(f"{'total':16} {format_bytes(self.params + self.gradients + self.optimizer_state + self.activations):>12} "
                     f"{format_bytes(self.per_device['total']):>12}")
        lines.append(f"FLOPs per step: {self.flops_per_step:.4g} "
                     f"({self.hardware_flops_per_step:.4g} with remat recompute)")
        return "\n".join(lines)

    def __str__(self):
        return self.table()


def estimate(
    variant,
    image_size=224,
    batch_size=1,
    optimizer="adam",
    param_dtype="float32",
    compute_dtype="float32",
    remat=False,
    mesh=None,
    num_classes=1000,
    **config_overrides,
):
    """Estimates the memory and FLOPs of one training step.

    Args:
        variant: a variant such as "G/14" or "22B/14" (see
            `kvs.config.VARIANTS`), or a `ViTConfig` (then `image_size`,
            `num_classes` and overrides are ignored).
        image_size: image side (int) or (h, w).
        batch_size: global batch size; must divide evenly over
            data * fsdp devices.
        optimizer: one of "adam", "bf16_adam", "scaling_adafactor", "sgd".
        param_dtype: dtype of the parameters and gradients.
        compute_dtype: dtype of the activations ("float32", "bfloat16";
            "bfloat16" with float32 params is Keras' "mixed_bfloat16").
        remat: rematerialise each block in the backward pass.
        mesh: device mesh, {"data": 8, "fsdp": 1, "model": 1} or
            "data:4,model:2"; default one device.
        num_classes: classifier outputs.
        **config_overrides: other `ViTConfig` fields (pooling, block,
            qk_norm, ...).

    Returns:
        A `MemoryEstimate`.

    Example:
    >>> est = kvs.planning.estimate("G/14", batch_size=4096, optimizer="scaling_adafactor",
    ...                             compute_dtype="bfloat16", remat=True,
    ...                             mesh={"data": 64, "fsdp": 8, "model": 1})
    >>> print(est)
    """
    if isinstance(variant, ViTConfig):
        cfg = variant
    else:
        if not isinstance(variant, str) or variant.split("/")[0] not in VARIANTS:
            raise ValueError(
                f"Unknown variant {variant!r}; use one of {', '.join(VARIANTS)} "
                "with a patch size, e.g. 'B/16' or 'G/14'."
            )
        cfg = ViTConfig.from_variant(variant, image_size=image_size,
                                     num_classes=num_classes, **config_overrides)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)}.")
    for name, dtype in (("param_dtype", param_dtype), ("compute_dtype", compute_dtype)):
        if dtype not in DTYPE_BYTES:
            raise ValueError(f"Unknown {name} {dtype!r}; choose one of {list(DTYPE_BYTES)}.")
    mesh = parse_mesh(mesh)
    batch_shards = mesh["data"] * mesh["fsdp"]
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % batch_shards:
        raise ValueError(
            f"batch_size={batch_size!r} must be a positive multiple of "
            f"data*fsdp = {batch_shards} (the devices the batch is split over)."
        )
    device_batch = batch_size // batch_shards
    param_shards = mesh["fsdp"] * mesh["model"]
    pbytes = DTYPE_BYTES[param_dtype]

    params = grads = opt = 0
    params_dev = grads_dev = opt_dev = 0.0
    for shape in cfg.parameter_shapes().values():
        # Matrices are sharded over fsdp * model, vectors replicated.
        shards = param_shards if len(shape) >= 2 else 1
        size = math.prod(shape) * pbytes
        slots = sum(math.prod(s) * DTYPE_BYTES[dt] for s, dt in _slots(optimizer, shape, param_dtype))
        params += size
        opt += slots
        params_dev += size / shards
        opt_dev += slots / shards
    grads, grads_dev = params, params_dev

    replicated, sharded, outside = _activation_elements(cfg)
    cb = DTYPE_BYTES[compute_dtype]
    n, d, h = cfg.num_tokens, cfg.width, cfg.num_heads
    softmax = SOFTMAX_BYTES * h * n * n
    block = (replicated + sharded) * cb + softmax
    block_dev = replicated * cb + (sharded * cb + softmax) / mesh["model"]
    block_input = n * d * cb
    image = math.prod(cfg.image_size) * cfg.in_channels * 4  # float32 input batch

    def total(per_block, rebuild):
        # No remat: every block's saved set. Remat: every block's input, and
        # one block's saved set while it is being rebuilt.
        blocks = cfg.depth * block_input + per_block if rebuild else cfg.depth * per_block
        return blocks + outside * cb + image

    act_no_remat = total(block, False) * batch_size
    act_remat = total(block, True) * batch_size
    activations = act_remat if remat else act_no_remat
    activations_dev = total(block_dev, remat) * device_batch

    per_device = {
        "params": int(params_dev),
        "gradients": int(grads_dev),
        "optimizer_state": int(opt_dev),
        "activations": int(activations_dev),
    }
    per_device["total"] = sum(per_device.values())
    forward = cfg.flops_per_image() * batch_size
    return MemoryEstimate(
        config=cfg, batch_size=batch_size, device_batch_size=device_batch,
        optimizer=optimizer, param_dtype=param_dtype, compute_dtype=compute_dtype,
        remat=bool(remat), mesh=mesh, num_params=cfg.count_params(),
        params=params, gradients=grads, optimizer_state=opt,
        activations=int(activations), activations_no_remat=int(act_no_remat),
        activations_remat=int(act_remat), activations_per_block=int(block),
        per_device=per_device, flops_per_step=3.0 * forward,
        hardware_flops_per_step=(4.0 if remat else 3.0) * forward,
    )


def _activation_elements(cfg):
    """(replicated, model-sharded) elements one block saves, and the rest.

    Per example. "replicated" are width-d tensors every model-parallel
    device holds; "sharded" are split over heads / MLP columns. Softmax
    probabilities are added separately (float32). See the module docstring.
    """
    n, d, m = cfg.num_tokens, cfg.width, cfg.mlp_dim
    qk_norm = 2 * n * d if cfg.qk_norm and cfg.block != "vanilla" else 0
    if cfg.block == "sequential":
        replicated = 4 * n * d      # LN1 in, QKV in, LN2 in, MLP in
        if cfg.layer_scale is not None:
            replicated += 2 * n * d  # the two scaled branch outputs
        # q, k, v, attention out; GELU in/out (SwiGLU: [a | b], silu(a), product)
        hidden = 4 * n * m if cfg.mlp_type == "swiglu" else 2 * n * m
        sharded = 4 * n * d + hidden
    elif cfg.block == "parallel":
        replicated = 2 * n * d      # LN in, fused-projection in
        sharded = 4 * n * d + 2 * n * m
    else:  # vanilla: no LN, no attention output projection, TReLU after the MLP
        replicated = 3 * n * d      # QKV in, MLP in, second TReLU in
        sharded = 3 * n * d + 2 * n * m
    # Outside the blocks: the patch-embedding output, the final LN input and
    # output, the pooled features and the logits.
    outside = 3 * n * d + cfg.feature_dim + cfg.num_classes
    if cfg.pre_norm:
        outside += n * d  # the pre-encoder LayerNorm's input
    if cfg.pooling == "map":
        # probe attention over the tokens: keys and values (2 n d) and its
        # inputs (n d), then an MLP on one token.
        outside += 3 * n * d + cfg.num_heads * n + 4 * d + 2 * cfg.mlp_dim
    return replicated, sharded + qk_norm, outside


@functools.lru_cache(maxsize=None)
def _optimizer(name):
    # The package's optimizers own their slot layout (`state_specs`); one
    # instance each is enough to ask it. Adam is BF16Adam with float32 slots.
    from keras_vitscale import optimizers

    if name == "adam":
        return optimizers.BF16Adam(mu_dtype="float32", nu_dtype="float32")
    if name == "bf16_adam":
        return optimizers.BF16Adam()
    return optimizers.ScalingAdafactor()


def _slots(optimizer, shape, param_dtype):
    """[(shape, dtype)] of the optimizer slots for one parameter."""
    if optimizer == "sgd":
        return []
    specs = _optimizer(optimizer).state_specs(tuple(shape), param_dtype)
    return [(tuple(s), str(dt)) for _, s, dt, _ in specs]
