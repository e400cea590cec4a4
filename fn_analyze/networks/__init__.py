"""Finding the networks: preprocessing of the token rows (`preprocess`), the reduction over shards
(`reduction`), the consensus of seeded ICA runs (`consensus`), and the estimator that joins them into a
mask file (`ica`)."""
