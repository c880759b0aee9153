#!/usr/bin/env python
"""`kvs-plan-memory` from a checkout; the tool is keras_vitscale/cli/plan_memory.py."""
import sys

from keras_vitscale.cli.plan_memory import main

sys.exit(main())
