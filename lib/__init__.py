"""SuPreM active-annotation library: networks, transforms, tasks, strategies, rounds, data."""
