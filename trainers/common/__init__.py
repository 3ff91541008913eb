"""The bottom layer: what every other part of the project shares, importing none of it.

storage   where files live (a folder or object storage), written whole
keys      content keys for caches (never a name alone)
weights   reading a weights file without unpickling
seeds     the project's one seed scheme
errors    every user-facing error type, one-line messages, and the entry points' error report
layout    the sweep folder: every path under `<storage>/<sweep>` named once

It sits inside trainers/ only because the user's top level is fixed; nothing here imports trainers
(or eval, objectives, sweeps), and tests/test_layers.py holds that.
"""
