"""An independent float64 numpy ViT forward pass, written from the papers'
formulas (ViT, big_vision's numerics, ViT-22B's parallel block, register
tokens, LayerScale, SwiGLU, OpenCLIP's pre-encoder LayerNorm).

Reads the weights of a kvs.ViT by variable path; used to check the Keras
layers on every backend where no outside library has the same model
(ViT-22B's parallel block, big_vision's MAP head, sincos2d).
"""

import math

import numpy as np


def layer_norm(x, w, prefix, eps, bias=True):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * w[f"{prefix}/gamma"]
    return y + w[f"{prefix}/beta"] if bias and f"{prefix}/beta" in w else y


def gelu(x, flavour):
    if flavour == "tanh":
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))


def silu(x):
    return x / (1 + np.exp(-x))


def dense(x, w, prefix):
    y = x @ w[f"{prefix}/kernel"]
    return y + w[f"{prefix}/bias"] if f"{prefix}/bias" in w else y


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def mha(q, k, v, heads, qn=None, kn=None):
    b, t, d = q.shape
    s = k.shape[1]
    q = q.reshape(b, t, heads, d // heads)
    k = k.reshape(b, s, heads, d // heads)
    v = v.reshape(b, s, heads, d // heads)
    if qn is not None:
        q, k = qn(q), kn(k)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d // heads)
    return np.einsum("bhts,bshd->bthd", softmax(logits), v).reshape(b, t, d)


def sincos2d(rows, cols, width):
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / (quarter - 1))
    out = np.zeros((rows * cols, width))
    for r in range(rows):
        for c in range(cols):
            i = r * cols + c
            out[i] = np.concatenate([np.sin(c * omega), np.cos(c * omega),
                                     np.sin(r * omega), np.cos(r * omega)])
    return out


def forward(model, images):
    cfg = model.config
    w = {v.path: np.asarray(v.numpy(), dtype="float64") for v in model.weights}
    eps = cfg.layer_norm_epsilon
    x = np.asarray(images, dtype="float64")
    b, h, wd, ch = x.shape
    ph, pw = cfg.patch_size
    patches = x.reshape(b, h // ph, ph, wd // pw, pw, ch).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, -1, ph * pw * ch)
    x = patches @ w["patch_embedding/kernel"].reshape(-1, cfg.width)
    if cfg.patch_bias:
        x = x + w["patch_embedding/bias"]

    def posemb(x):
        if cfg.posemb == "learn":
            return x + w["position_embedding/embedding"]
        if cfg.posemb == "sincos2d":
            return x + sincos2d(*cfg.grid_size, cfg.width)[None]
        return x

    # Sequence [class, registers..., patches]; the position embedding is
    # added to the patches alone, or to the whole sequence when it covers
    # the prefix tokens.
    prefix = []
    if cfg.class_token:
        prefix.append(np.repeat(w["class_token/token"], b, 0))
    if cfg.num_register_tokens:
        prefix.append(np.repeat(w["register_tokens/tokens"], b, 0))
    if not cfg.posemb_covers_class_token:
        x = posemb(x)
    num_prefix = sum(t.shape[1] for t in prefix)
    x = np.concatenate(prefix + [x], 1)
    if cfg.posemb_covers_class_token:
        x = posemb(x)
    if cfg.pre_norm:
        x = layer_norm(x, w, "pre_norm", eps)

    def scaled(y, path):
        return y if cfg.layer_scale is None else y * w[path]

    def mlp(y, p):
        h = dense(y, w, f"{p}/mlp/dense_1")
        if cfg.mlp_type == "swiglu":
            gate, value = np.split(h, 2, -1)
            h = silu(gate) * value
        else:
            h = gelu(h, cfg.gelu)
        return dense(h, w, f"{p}/mlp/dense_2")
    for i in range(cfg.depth):
        p = f"encoder_block_{i}"
        if cfg.block == "sequential":
            a = f"{p}/attention"
            qn = kn = None
            if cfg.qk_norm:
                qn = lambda t, a=a: layer_norm(t, w, f"{a}/query_norm", eps)  # noqa: E731
                kn = lambda t, a=a: layer_norm(t, w, f"{a}/key_norm", eps)  # noqa: E731
            y = layer_norm(x, w, f"{p}/norm_1", eps)
            q, k, v = np.split(dense(y, w, f"{a}/qkv"), 3, -1)
            y = dense(mha(q, k, v, cfg.num_heads, qn, kn), w, f"{a}/out")
            x = x + scaled(y, f"{p}/layer_scale_1/gamma")
            y = mlp(layer_norm(x, w, f"{p}/norm_2", eps), p)
            x = x + scaled(y, f"{p}/layer_scale_2/gamma")
        else:  # parallel: y = x + Attn(LN(x)) + MLP(LN(x)), fused projections
            y = layer_norm(x, w, f"{p}/norm", eps)
            d = cfg.width
            kernel = w[f"{p}/qkv_mlp_in/kernel"]
            qkv, hid = y @ kernel[:, :3 * d], y @ kernel[:, 3 * d:]
            qkv = qkv + w.get(f"{p}/qkv_mlp_in/qkv_bias", 0)
            hid = hid + w.get(f"{p}/qkv_mlp_in/mlp_bias", 0)
            qn = kn = None
            if cfg.qk_norm:
                qn = lambda t, p=p: layer_norm(t, w, f"{p}/query_norm", eps)  # noqa: E731
                kn = lambda t, p=p: layer_norm(t, w, f"{p}/key_norm", eps)  # noqa: E731
            q, k, v = np.split(qkv, 3, -1)
            att = mha(q, k, v, cfg.num_heads, qn, kn)
            out_kernel = w[f"{p}/attn_mlp_out/kernel"]
            out = att @ out_kernel[:d] + gelu(hid, cfg.gelu) @ out_kernel[d:]
            x = x + out + w.get(f"{p}/attn_mlp_out/bias", 0)
    if cfg.norm_position == "before_pool":
        x = layer_norm(x, w, "encoder_norm", eps)
    if cfg.pooling == "tok":
        x = x[:, 0]
    elif cfg.pooling == "gap":
        x = x[:, num_prefix:].mean(1)  # the patches only
    elif cfg.pooling == "map":
        probe = np.repeat(w["map_head/probe"], b, 0)
        q = dense(probe, w, "map_head/query")
        k, v = np.split(dense(x, w, "map_head/key_value"), 2, -1)
        y = dense(mha(q, k, v, cfg.num_heads), w, "map_head/out")
        y = y + dense(gelu(dense(layer_norm(y, w, "map_head/norm", eps), w,
                                 "map_head/mlp/dense_1"), cfg.gelu), w, "map_head/mlp/dense_2")
        x = y[:, 0]
    if cfg.norm_position == "after_pool":
        x = layer_norm(x, w, "encoder_norm", eps)
    if cfg.representation_size:
        x = np.tanh(dense(x, w, "pre_logits"))
    if cfg.num_classes:
        x = dense(x, w, "head")
    return x
