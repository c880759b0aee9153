#!/usr/bin/env python
"""`kvs-fit-scaling-law` from a checkout; the tool is keras_vitscale/cli/fit_scaling_law.py."""
import sys

from keras_vitscale.cli.fit_scaling_law import main

sys.exit(main())
