"""Benchmarks of gradinv: each script runs from the repository root as `python -m benchmarks.<name>`
and writes its results file under benchmarks/results/; `python -m benchmarks.write_docs` turns those
into docs/step_speed.md and docs/performance.md. The table of what each measures: benchmarks/README.md."""
