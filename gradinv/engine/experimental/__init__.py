"""Engine paths not yet timed on the hardware they are for (docs/engine.md): reached only
through engine settings that params.yaml does not list."""
