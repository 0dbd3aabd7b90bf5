"""Layer 3: one module per stage; typed config in, Parquet in the run directory out."""
