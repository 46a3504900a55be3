"""Importance scoring of unlabeled volumes (AbdomenAtlas-8K attention), in the server and offline."""
