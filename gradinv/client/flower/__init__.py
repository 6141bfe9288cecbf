"""Flower federations: an app on the embedded data, and a strategy wrapper that records what the
server receives from every client as gradinv artifacts. Needs the `flower` extra."""
