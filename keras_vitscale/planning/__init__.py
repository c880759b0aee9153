"""Planning a training run before it runs: memory, FLOPs and sharding.

- `memory_estimate`: analytic bytes (parameters, gradients, optimizer state,
  activations) and FLOPs of a training step per device, for a variant, a
  mesh and an optimizer; no model is built.
- `byte_sizes`: reading "16GiB" and printing sizes.
- `abstract_state`, `compiled_step`, `sharding_simulation` (JAX only): the
  training step of a model too big to build, compiled (never run) for a mesh
  from abstract shapes, and extrapolated to full depth and larger meshes.

Example:
```python
import keras_vitscale as kvs
est = kvs.planning.estimate("G/14", batch_size=8, optimizer="scaling_adafactor")
print(est.per_device["total"] / 2**30, est.fits("80GiB"))
```
"""

from keras_vitscale.planning import (
    abstract_state,
    byte_sizes,
    compiled_step,
    memory_estimate,
    sharding_simulation,
)
from keras_vitscale.planning.byte_sizes import format_bytes, parse_bytes
from keras_vitscale.planning.memory_estimate import MemoryEstimate, estimate

__all__ = ["MemoryEstimate", "abstract_state", "byte_sizes", "compiled_step", "estimate",
           "format_bytes", "memory_estimate", "parse_bytes", "sharding_simulation"]
