"""The mechanism of pruning: graphs, plans, cuts, scores, measures. Never imports Lightning."""
