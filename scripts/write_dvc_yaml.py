"""Write dvc.yaml from the stage registry (gradinv/pipeline/stages.py):

    python scripts/write_dvc_yaml.py > dvc.yaml

Each stage's deps are its input folders and its sources as derived from the code; tests/test_dvc.py
fails when dvc.yaml and the registry disagree."""

import yaml

from gradinv.pipeline.config import RESULT_CHANGING_ENGINE_SETTINGS
from gradinv.pipeline.stages import STAGES

METRICS = ["data/eval/metrics.json"]


def dvc_stages() -> dict:
    stages = {}
    for stage in STAGES.values():
        engine = [f"engine.{k}" for k in RESULT_CHANGING_ENGINE_SETTINGS] if stage.uses_engine else []
        stages[stage.name] = {
            "cmd": f"python -m flows.pipeline --stage {stage.name}",
            "deps": [*stage.inputs, *stage.sources],
            "params": [stage.section, *engine, "preset", "presets"],
            "outs": list(stage.outputs),
        }
    return stages


if __name__ == "__main__":
    print("# One stage per pipeline step, written by scripts/write_dvc_yaml.py from gradinv/pipeline/stages.py.")
    print("# Run `make repro` (it puts the project's environment on PATH), or `dvc repro` inside it.")
    print(yaml.safe_dump({"stages": dvc_stages()}, sort_keys=False), end="")
    print("# What `dvc exp show` and `dvc metrics diff` compare between experiments.")
    print(yaml.safe_dump({"metrics": METRICS}, sort_keys=False), end="")
