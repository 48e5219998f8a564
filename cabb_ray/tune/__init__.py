"""The hyper-parameter search: space files, trials, driver, leaderboard and CLI."""
