"""``python -m admin_api.cli``: the same as the ``tracechain`` console script."""

from admin_api.cli import main

main(prog_name="tracechain")
