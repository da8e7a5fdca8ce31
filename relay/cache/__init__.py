"""The verified cache: upstream fetcher, content-addressed blob store, mirror."""
