"""retention_jax: how the way a capability is acquired decides whether it survives fine-tuning."""
