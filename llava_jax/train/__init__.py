"""Training: optimizer with frozen towers, masked loss, sharded state, the jitted step."""
