"""What the tests, the benchmarks and the demo's sample share, kept out of the product (``lib/``): the
synthetic abdominal CT phantoms, deterministic synthetic weights in the released format, the numpy+scipy
transcription of the attention formula that the torch code is checked against, and a real server process
on a loopback port."""
