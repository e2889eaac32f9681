"""Files: the fitted state of a fold, the score tables, maps in the input geometry, atomic writes."""
