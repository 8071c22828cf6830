"""Per-layer latency: time the dense node and its factor pairs per rank on a backend
(``backend.py`` + one file per backend), cache and fit the curves (``profile.py``, ``predictor.py``),
and answer the rank stage through ``model.LatencyModel`` / ``model.load_latency_model``."""
