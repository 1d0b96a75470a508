"""``pdgate`` subcommands, one module each (see ``gateway.cli``)."""
