"""Performance benchmarks of the semiseg platform (see ``benchmarks/README.md``)."""
