"""The demo's federation as a Flower app: the product's trainer, data and aggregation behind Flower's plumbing."""
