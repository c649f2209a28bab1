"""CLI sub-commands: one module each, with ``register(subparsers)``. Listed in :mod:`mobilemoe.cli`."""
