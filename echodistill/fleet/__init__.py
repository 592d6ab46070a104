"""Many concepts on Ray, on one machine or a cluster: `echodistill fleet run | status | report`.

    manifest.py   the TOML manifest: shared defaults and [[concept]] tables, checked as a whole
    state.py      what a fleet leaves under --out: the state file, progress notes, the report
    worker.py     the Ray actor: loads the pair once, trains concept after concept (jobs.runs.train_concept)
    engine.py     the driver: a local cluster or --address, the queue, retries of lost workers, the bar

Ray is an optional extra (`pip install -e '.[fleet]'` in the pack's folder): only this package imports it, and
only `manifest` and `state` may be imported without it.
"""
