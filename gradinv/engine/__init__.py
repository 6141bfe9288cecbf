"""How one inversion step of all seeds is computed fast: seed stepping, device policy, CUDA
graphs, the allocator and the attacker's written-out layers. The attack calls it through the
names below; the client side never imports it."""

from gradinv.engine.policy import StepPlan, attacker_model, plan_step, running
from gradinv.engine.seed_step import SeedStep

__all__ = ["SeedStep", "StepPlan", "attacker_model", "plan_step", "running"]
