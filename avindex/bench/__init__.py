"""`avindex bench`: every stage measured against its bound and a naive baseline in one run."""
