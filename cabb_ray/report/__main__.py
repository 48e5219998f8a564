from cabb_ray.errors import run_cli
from cabb_ray.report.cli import main

run_cli(main)
