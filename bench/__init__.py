"""vecap's benchmarks: side-by-side comparisons on public interfaces, outside the library."""
