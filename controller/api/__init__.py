"""HTTP API routes, one module per area; ``controller.app`` includes them all."""
