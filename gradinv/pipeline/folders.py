"""Where each stage writes, relative to the project root."""

SETS, VICTIM = "data/sets", "data/victim"
GRADIENT, TRUTH = "data/capture/gradient", "data/capture/truth"
LABELS, INVERT, EVAL = "data/labels", "data/invert", "data/eval"
