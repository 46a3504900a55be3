"""What the tests and the benchmarks share, kept out of the product (``lib/``): deterministic synthetic
weights in the released format, the numpy+scipy transcription of the attention formula that the torch
code is checked against, and a real server process on a loopback port."""
