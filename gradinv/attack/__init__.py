"""The attacker side (GradInversion): label recovery, the objective, the inversion loop, the
seeds' consensus, views and checkpoints. Reads only the gradient artifact and the model."""
