#!/usr/bin/env python
"""`kvs-convert` from a checkout; the tool is keras_vitscale/cli/convert.py."""
import sys

from keras_vitscale.cli.convert import main

sys.exit(main())
