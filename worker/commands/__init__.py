"""The `isl` subcommands, grouped by what they run on (worker/cli.py assembles them)."""
