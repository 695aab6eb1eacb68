"""The benchmark behind `make bench`: every figure next to a baseline from the same run."""
