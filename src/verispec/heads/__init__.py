"""Draft heads that read the target's features: Medusa heads and the EAGLE head."""
