#!/usr/bin/env python
"""`kvs-pretrain` from a checkout; the tool is keras_vitscale/cli/pretrain.py."""
import os
import sys

# the tool's default backend (an explicit KERAS_BACKEND wins); set before
# the import below loads Keras.
os.environ.setdefault("KERAS_BACKEND", "jax")
from keras_vitscale.cli.pretrain import main  # noqa: E402

sys.exit(main())
