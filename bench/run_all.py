"""`make bench`: run every benchmark; each writes its own section of docs/benchmarks.md."""

import runpy
from pathlib import Path

HERE = Path(__file__).parent
for script in ("bench_coreset.py", "bench_border.py", "bench_anomalib.py", "bench_fidelity.py",
               "bench_reference.py", "bench_feddymem.py", "bench_secure.py", "bench_privacy.py", "bench_deploy.py",
               "bench_audit.py", "bench_predict.py", "bench_threshold.py"):
    print(f"== {script}", flush=True)
    runpy.run_path(str(HERE / script), run_name="__main__")
