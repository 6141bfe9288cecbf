"""The client side: data, models, victim training, the client's FedSGD/FedAvg step, capture,
defenses, and gradients brought in from outside. Never imports the engine."""
