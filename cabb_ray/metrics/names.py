"""Metric names and size bins, in a leaf module that imports nothing: the search space, the
leaderboard and the report name metrics without loading the evaluator (or torch)."""

# Scalars of every evaluation: Tune's and MLflow's metric names (docs/contracts.md, "Metric names")
METRIC_NAMES = (
    "pq",
    "sq",
    "rq",
    "pq_th",
    "sq_th",
    "rq_th",
    "pq_st",
    "sq_st",
    "rq_st",
    "pc",
    "pc_th",
    "pc_st",
    "pq_dagger",
    "miou",
    "map",
    "map50",
    "box_map",
    "box_map50",
)

# Mask and box AP are also reported per bin of ground-truth mask area, by these percentiles
# (the CABB paper's Fig. 5)
SIZE_PERCENTILES = (0, 50, 75, 90, 99, 100)
# ... and in one absolute bin: things wider or taller than the training crop (mask_ap.py)
OVER_CROP_BIN = "over_crop"
