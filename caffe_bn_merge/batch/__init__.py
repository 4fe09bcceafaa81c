"""`merge-bn batch`: convert a fleet of deployments (deploy prototxt + one or more caffemodels).

One module per job:

- `discovery`: `classify_prototxt` tells deploy nets from train/test nets and solvers by content;
  `pair_folder` / `discover` pair each caffemodel with its deploy prototxt; `read_manifest` reads an
  explicit list instead;
- `worklist`: `plan_discovered` / `plan_manifest` give every deployment its outputs under OUTDIR
  and a key (its output path relative to OUTDIR, without suffix), sorted by key; `check_outputs`
  refuses outputs that collide or would overwrite a source; `shard` keeps a deterministic 1/n;
- `pool`: `convert_item` converts (and optionally verifies) one deployment and never raises;
  `run_items` runs many, in worker processes;
- `report`: the JSON report (``"schema": 1``); `console`: the progress bar and table (the only
  batch code that prints); `args`: the argument parser; `command`: `main`, the four steps.

Sharding (`--shard i/n`, i from 1): the work list is sorted by key, and shard i keeps the items whose
position p in it (from 0) has p % n == i - 1. Keys depend only on the SRC folders' names and the
files under them (or the manifest), so every machine of a job array given the same SRC arguments
computes the same list and the n shards partition it.
"""
