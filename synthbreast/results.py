"""The file names and schema ids of every job's results, defined once.

Writers, the CLI and the report import them from here; this module imports nothing heavy
(no torch), so the report can read any result without loading a model.
"""

from __future__ import annotations

CONFIG = "config.json"  # the job's config dataclass (synthbreast/config.py), written first
MANIFEST = "manifest.json"  # a shard folder's list of shards (synthbreast/data/shards.py)

# classify: OUT/<scenario>/
METRICS = "metrics.json"  # written last: a scenario folder with a whole one is complete
FAILED = "failed.json"  # a scenario that raised: its error, for the report
PREDICTIONS = "predictions.csv"
MODEL = "model.safetensors"
METRICS_SCHEMA = "synthbreast-classify-metrics/1"

# train-gan: <outdir>/<run>/
STATS = "stats.jsonl"  # one line per tick
METRIC_FILE = "metric-texture.jsonl"  # one line per snapshot (synthbreast/eval/quality.py)

# fidelity: OUT/
FIDELITY = "fidelity.json"
FIDELITY_SCHEMA = "synthbreast-fidelity/3"  # 3: SiFID of SinGAN sets ("sifid")
# 2: real-vs-real floors, equal memorisation pools. The report reads these too (3 only adds a
# section); fidelity redoes a result of an older schema.
FIDELITY_READABLE = (FIDELITY_SCHEMA, "synthbreast-fidelity/2")

# study: OUT/
SUMMARY = "summary.json"
TASKS = "tasks"  # OUT/tasks/<task>.json
STUDY_TASK_SCHEMA = "synthbreast-study-task/1"
STUDY_SUMMARY_SCHEMA = "synthbreast-study-summary/1"

CONFIGS = "configs"  # the chain's OUT/configs/<stage>.json (synthbreast/chain.py)

# Folders below a run that never hold results the report reads: model state, image snapshots,
# inspect grids, the chain's stage configs, and feature caches ("features": fidelity's
# histology space is an ordinary real-real classify run there, which must not stand in for
# the chain's own real-real result; fidelity.json reports it as the space's quality).
NOT_RESULTS = ("checkpoints", "samples", "inspect", "__pycache__", "figures", "features", CONFIGS)
