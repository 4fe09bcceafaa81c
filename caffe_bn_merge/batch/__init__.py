"""`merge-bn batch`: convert a fleet of deployments (deploy prototxt + one or more caffemodels);
`merge-bn batch-report`: merge the reports of a job array's shards.

One module per job:

- `discovery`: `walk` lists each folder's prototxts and caffemodels (reading no file, reporting
  what it cannot reach); `classify_prototxt` tells deploy nets from train/test nets and solvers by
  content; `pair_folder` / `pair` pair each caffemodel with its deploy prototxt; `read_manifest`
  reads an explicit list instead;
- `worklist`: `plan_discovered` / `plan_manifest` give every deployment its outputs under OUTDIR
  and a key (its output path relative to OUTDIR, without suffix), sorted by key; `check_outputs`
  refuses outputs that collide or would overwrite a source; `shard` keeps a deterministic 1/n,
  `auto_shard` finds i/n in a Slurm or Kubernetes environment; `build_work_list` pairs only the
  shard's caffemodels;
- `pool`: `convert_item` converts (and optionally verifies) one deployment and never raises;
  `run_items` runs many, in warm worker processes, each with a `pipeline.NetCache`;
- `report`: the JSON report (``"schema": 1``) and `merge_reports`; `console`: the progress bar and
  table (the only batch code that prints); `args`: the argument parsers; `command`: `main`, the
  four steps, and `report_main`.

Sharding (`--shard i/n`, i from 1): the work list is sorted by key, and shard i keeps the items whose
position p in it (from 0) has p % n == i - 1. Keys depend only on the SRC folders' names and the
files under them (or the manifest), so every machine of a job array given the same SRC arguments
computes the same list and the n shards partition it.
"""
