"""The TKD-NLP study: an experiment driver on top of the trainer, outside the library core.

    python -m tkd_core.study --task sst2 --data-dir ../shared/data/glue/SST-2 --out runs/sst2

plan.py (what is trained), jobs.py (resumable subprocess scheduling), measurements.py (metrics,
sizes, latency of the trained runs), stats.py (seed noise, targets), report.py (report.md and
plots), estimate.py (--estimate), run.py (the command line and the orchestration).
"""
