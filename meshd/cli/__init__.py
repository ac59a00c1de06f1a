"""Command-line entry points: `meshctl` for operators and `meshd` for the daemon."""
