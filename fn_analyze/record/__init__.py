"""Recording: the model run over a dataset, each MLP down-projection's input written to float16 HDF5
shards with their manifest (`collect`), read back as token rows (`activations`, `token_rows`), or produced
by the model pass by pass when no folder is kept (`model_rows`)."""
