#!/usr/bin/env python
"""`kvs-plot-schedule` from a checkout; the tool is keras_vitscale/cli/plot_schedule.py."""
import os
import sys

# the tool's default backend (an explicit KERAS_BACKEND wins); set before
# the import below loads Keras.
os.environ.setdefault("KERAS_BACKEND", "numpy")
from keras_vitscale.cli.plot_schedule import main  # noqa: E402

sys.exit(main())
