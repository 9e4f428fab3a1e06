"""Stage one: datasets, projection, the MaskCLIP teacher, and the cache-writing pipeline."""
