#!/usr/bin/env python
"""`kvs-push-to-hub` from a checkout; the tool is keras_vitscale/cli/push_to_hub.py."""
import sys

from keras_vitscale.cli.push_to_hub import main

sys.exit(main())
