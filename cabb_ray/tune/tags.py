"""Names that the search writes into MLflow and Tune results, in a leaf module: the report
and the leaderboard read them without importing the training code (or torch)."""

from __future__ import annotations

from cabb_ray.errors import ERROR_REPORT_KEY

TAG_SEARCH = "cabb_ray.search"  # on the parent and every child: the search's name
TAG_TRIAL = "cabb_ray.trial_id"
TAG_OUTCOME = "cabb_ray.outcome"  # finished | early_stopped | failed | invalid | interrupted
TAG_SAMPLED = "cabb_ray.sampled"  # JSON of the searched values
TAG_BEST = "cabb_ray.best"
TAG_VARIANT = "cabb_ray.variant"  # an ablation row's name (space files with variants:)
INVALID_KEY = "invalid_config"  # in a trial's one report: its sampled config was invalid
ERROR_KEY = ERROR_REPORT_KEY  # in a trial's last report: it failed in a way a retry repeats


def children_filter(search: str, trial_id: str | None = None) -> str:
    """MLflow filter for a search's child runs (names are checked to hold no quotes)."""
    trial = f"= '{trial_id}'" if trial_id else "!= ''"
    return f"tags.`{TAG_SEARCH}` = '{search}' and tags.`{TAG_TRIAL}` {trial}"
