"""One module per phase; each exports one step function named for the state
it produces, ``step(ctx) -> Result``, idempotent and free of kopf."""
