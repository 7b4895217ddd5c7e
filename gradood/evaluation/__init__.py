"""The evaluation grid: every model family x group size x OOD source x test, on public sources."""
