"""Write dvc.yaml from the stage registry (gradinv/stages.py):

    python scripts/write_dvc_yaml.py > dvc.yaml

tests/test_dvc.py fails when the two disagree."""

import yaml

from gradinv.stages import STAGES

# Sources that every stage's Prefect cache key also covers (tasks/caching.py).
TASK_SOURCES = ["gradinv/stages.py", "tasks/stages.py", "tasks/caching.py"]

METRICS = ["data/eval/metrics.json"]


def dvc_stages() -> dict:
    return {
        stage.name: {
            "cmd": f"python -m flows.pipeline --stage {stage.name}",
            "deps": [*stage.inputs, *stage.sources, *TASK_SOURCES],
            "params": [stage.section, "preset", "presets"],
            "outs": list(stage.outputs),
        }
        for stage in STAGES.values()
    }


if __name__ == "__main__":
    print("# One stage per pipeline step, written by scripts/write_dvc_yaml.py from gradinv/stages.py.")
    print("# Run `make repro` (it puts the project's environment on PATH), or `dvc repro` inside it.")
    print(yaml.safe_dump({"stages": dvc_stages()}, sort_keys=False), end="")
    print("# What `dvc exp show` and `dvc metrics diff` compare between experiments.")
    print(yaml.safe_dump({"metrics": METRICS}, sort_keys=False), end="")
