"""The command-line tools: one module per tool, each with `build_parser()`
and `main(argv=None) -> int` (the exit status).

They are installed as console scripts (`kvs-pretrain`, `kvs-finetune`, ...)
and run from a checkout as `python tools/<tool>.py`; both print the same
`--help`. Exit status: 0 done, 2 bad settings, 3 a non-finite loss, 130
interrupted (Ctrl-C).

Example:
```python
from keras_vitscale.cli import pretrain
status = pretrain.main(["--steps", "20", "--workdir", "runs/smoke"])
```
"""
