"""Pruning: neurons ranked by importance (`importance`), the MLPs cut down with the networks kept first
(`pruning`), and a pruned folder scored against importance alone and random prunings (`pruned_eval`)."""
